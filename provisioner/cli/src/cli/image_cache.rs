//! `kiln image list` and `kiln image cache`: every image a cluster of this Kiln version needs
//! (the installer, the node image, and those named in machine configurations), and copying
//! them into the lab's registry or into a directory of OCI archives to carry into an
//! air-gapped site, as the guide does with `docker pull`, `tag` and `push`.
//!
//! An image is stored in the destination registry without its registry host (`ghcr.io/a/b:t`
//! becomes `<registry>/a/b:t`), so a node whose `machine.registries.mirrors` point every host
//! at that registry finds it. In a directory each image is one OCI layout archive named after
//! the reference ([`archive_name`]); `--from DIR` reads the same names back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use kiln_config::types::MachineConfig;
use kiln_provisioner::output::{self, OutputFormat};
use kiln_registry_mirror::client::{ClientConfig, RegistryClient};
use kiln_registry_mirror::reference::ImageRef;
use serde::Serialize;

/// Flags of `kiln image list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Machine configuration whose images (installer, kubelet, static pods) are added.
    /// Repeatable.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Output format (table: one reference a line).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Flags of `kiln image cache`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Destination: a directory (a path with '/', or an existing directory) receives one OCI
    /// archive per image; otherwise a registry HOST[:PORT] receives the images without their
    /// registry host.
    #[arg(long, value_name = "DIR|REGISTRY")]
    pub to: String,
    /// Directory of OCI archives (or layout directories) named as `kiln image cache --to DIR`
    /// writes them. Repeatable; searched first.
    #[arg(long = "from", value_name = "DIR")]
    pub from_dirs: Vec<PathBuf>,
    /// Registry HOST[:PORT] holding the images under their names without registry host
    /// (searched after --from and the image store).
    #[arg(long, value_name = "REGISTRY")]
    pub from_registry: Option<String>,
    /// Image store holding `kiln image build` output, for the installer (default:
    /// ~/.kiln/images).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Machine configurations whose images are cached too. Repeatable.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Cache these images instead of `kiln image list`'s. Repeatable.
    #[arg(long = "image", value_name = "REF")]
    pub images: Vec<String>,
    /// Talk plain HTTP to the registries (the lab registry serves plain HTTP).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub plain_http: bool,
    /// Output format of the summary.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// One image a cluster needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct NeededImage {
    /// The reference as nodes name it.
    pub image: String,
    /// Why it is needed.
    pub source: String,
}

/// The images of a default cluster of this Kiln version.
pub fn default_images() -> Vec<NeededImage> {
    vec![
        NeededImage {
            image: kiln_config::generate::DEFAULT_INSTALLER_IMAGE.to_owned(),
            source: "installer".to_owned(),
        },
        NeededImage {
            image: kiln_config::generate::DEFAULT_NODE_IMAGE.to_owned(),
            source: "node image".to_owned(),
        },
    ]
}

/// The images `config` names: the installer, the kubelet, and the containers of static pods.
pub fn config_images(config: &MachineConfig) -> Vec<(String, &'static str)> {
    let m = &config.machine;
    let mut out = Vec::new();
    if let Some(i) = m.install.as_ref().and_then(|i| i.image.clone()) {
        out.push((i, "machine.install.image"));
    }
    if let Some(i) = m.kubelet.as_ref().and_then(|k| k.image.clone()) {
        out.push((i, "machine.kubelet.image"));
    }
    for pod in &m.pods {
        let spec = pod.get("spec").and_then(|s| s.as_mapping());
        for key in ["initContainers", "containers"] {
            let containers = spec
                .and_then(|s| s.get(key))
                .and_then(|c| c.as_sequence())
                .into_iter()
                .flatten();
            for c in containers {
                if let Some(i) = c.get("image").and_then(|i| i.as_str()) {
                    out.push((i.to_owned(), "machine.pods"));
                }
            }
        }
    }
    out
}

/// Every image: the defaults and those of `configs`, each once (the first reason kept).
pub fn needed(configs: &[PathBuf]) -> anyhow::Result<Vec<NeededImage>> {
    let mut out = default_images();
    for path in configs {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading machine configuration {}", path.display()))?;
        let config = kiln_config::from_yaml(&text)
            .with_context(|| format!("parsing machine configuration {}", path.display()))?;
        for (image, why) in config_images(&config) {
            out.push(NeededImage {
                image,
                source: format!("{why} in {}", path.display()),
            });
        }
    }
    let mut seen = BTreeSet::new();
    out.retain(|i| seen.insert(i.image.clone()));
    Ok(out)
}

/// `kiln image list`.
pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let images = needed(&args.configs)?;
    output::print(args.output, &images, |images| {
        images.iter().map(|i| format!("{}\n", i.image)).collect()
    })
}

/// A reference with its registry host made explicit the way container runtimes do:
/// `kiln/installer:v1` is `docker.io/kiln/installer:v1`.
pub fn parse_image(image: &str) -> anyhow::Result<ImageRef> {
    ImageRef::normalized(image).with_context(|| format!("image reference {image:?}"))
}

/// The archive name of `image` in a cache directory: the reference with `/`, `:` and `@`
/// replaced by `_` (`kiln/installer:v1` → `kiln_installer_v1.tar`).
pub fn archive_name(image: &str) -> String {
    let stem: String = image
        .chars()
        .map(|c| if matches!(c, '/' | ':' | '@') { '_' } else { c })
        .collect();
    format!("{stem}.tar")
}

/// Where an image was found.
#[derive(Debug, Clone)]
enum Found {
    /// An OCI archive or layout directory.
    Layout(PathBuf),
    /// A registry.
    Registry(String),
    /// The node image, packed here from the node root filesystem (a layout in the scratch
    /// directory).
    NodeRootfs(PathBuf),
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Layout(p) => write!(f, "{}", p.display()),
            Found::Registry(r) => write!(f, "registry {r}"),
            Found::NodeRootfs(_) => write!(f, "node root filesystem (machined next to kiln)"),
        }
    }
}

/// Packs the node image (`kiln/node`, as the docker provisioner imports it) into an OCI layout
/// at `dir`, tagged `tag`: one layer with the node root filesystem (machined, etcd, etcdctl and
/// their libraries), machined as the entrypoint.
fn pack_node_image(dir: &Path, tag: &str) -> anyhow::Result<PathBuf> {
    use kiln_provisioner::provision::docker::engine;
    let machined = engine::machined_binary()?;
    let rootfs =
        kiln_image::rootfs::Rootfs::resolve(&kiln_image::rootfs::RootfsInputs::new(machined))?;
    let work = dir.with_extension("work");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let tar = rootfs.write_tar(Vec::new(), &work, &kiln_image::Quiet)?;
    let _ = std::fs::remove_dir_all(&work);
    let layout = kiln_registry_mirror::archive::OciLayout::create(dir)?;
    kiln_registry_mirror::archive::build_image_from_tars(
        &layout,
        &[tar],
        &serde_json::json!({
            "Entrypoint": [kiln_image::rootfs::MACHINED],
            "Env": ["PATH=/usr/bin"],
            "Labels": {engine::IMAGE_LABEL: rootfs.digest},
        }),
        kiln_registry_mirror::archive::ImageFormat::Oci,
        tag,
    )?;
    Ok(dir.to_owned())
}

/// The installer layout of the newest image of this Kiln version in the store.
fn store_installer(store: &Path) -> Option<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let mut images: Vec<_> = kiln_image::list(store)
        .ok()?
        .into_iter()
        .filter(|m| m.installer_digest.is_some() && m.version.starts_with(version))
        .collect();
    images.sort_by_key(|m| m.created);
    let newest = images.pop()?;
    let dir = store
        .join(&newest.version)
        .join(kiln_image::builder::names::INSTALLER);
    dir.is_dir().then_some(dir)
}

fn is_directory_destination(to: &str) -> bool {
    to.contains('/') || to.starts_with('.') || Path::new(to).is_dir()
}

fn client(host: &str, plain_http: bool) -> anyhow::Result<RegistryClient> {
    let scheme = if plain_http { "http" } else { "https" };
    let url = url::Url::parse(&format!("{scheme}://{host}"))
        .with_context(|| format!("registry {host:?}: write HOST[:PORT]"))?;
    Ok(RegistryClient::new(ClientConfig::new(url))?)
}

#[derive(Debug, Serialize)]
struct Cached {
    image: String,
    from: String,
    to: String,
    digest: String,
}

/// `kiln image cache`.
pub async fn cache(args: CacheArgs) -> anyhow::Result<()> {
    let images: Vec<String> = if args.images.is_empty() {
        needed(&args.configs)?
            .into_iter()
            .map(|i| i.image)
            .collect()
    } else {
        args.images.clone()
    };
    let store = match &args.store {
        Some(s) => Some(s.clone()),
        None => kiln_image::store::default_root(),
    };
    let to_dir = is_directory_destination(&args.to).then(|| PathBuf::from(&args.to));
    if let Some(d) = &to_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let to_client = match &to_dir {
        Some(_) => None,
        None => Some(client(&args.to, args.plain_http)?),
    };
    let from_client = match &args.from_registry {
        Some(r) => Some(client(r, args.plain_http)?),
        None => None,
    };
    let scratch = tempfile::tempdir().context("creating a temporary directory")?;
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for image in &images {
        let parsed = parse_image(image)?;
        let archive = archive_name(image);
        let mut found = args
            .from_dirs
            .iter()
            .flat_map(|d| [d.join(&archive), d.join(archive.trim_end_matches(".tar"))])
            .find(|p| p.exists())
            .map(Found::Layout);
        if found.is_none() && *image == kiln_config::generate::DEFAULT_INSTALLER_IMAGE {
            found = store
                .as_deref()
                .and_then(store_installer)
                .map(Found::Layout);
        }
        if found.is_none()
            && let (Some(c), Some(r)) = (&from_client, &args.from_registry)
        {
            match c.get_manifest(&parsed.name, &parsed.reference).await {
                Ok(_) => found = Some(Found::Registry(r.clone())),
                Err(e) if e.status().is_some_and(|s| s.as_u16() == 404) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("looking up {image} in {r}"));
                }
            }
        }
        if found.is_none() && *image == kiln_config::generate::DEFAULT_NODE_IMAGE {
            let dir = scratch.path().join("node-image");
            let tag = parsed.reference.to_string();
            let layout = tokio::task::spawn_blocking(move || pack_node_image(&dir, &tag))
                .await
                .context("packing the node image")??;
            found = Some(Found::NodeRootfs(layout));
        }
        let Some(found) = found else {
            missing.push(image.clone());
            continue;
        };
        // A registry source is exported to an archive first; layouts are used as they are.
        let layout = match &found {
            Found::Layout(p) | Found::NodeRootfs(p) => p.clone(),
            Found::Registry(_) => {
                let file = scratch.path().join(&archive);
                let c = from_client.as_ref().context("no source registry")?;
                kiln_registry_mirror::archive::export(c, &parsed.name, &parsed.reference, &file)
                    .await
                    .with_context(|| format!("exporting {image} from {found}"))?;
                file
            }
        };
        let (to, digest) = match (&to_dir, &to_client) {
            (Some(dir), _) => {
                let dest = dir.join(&archive);
                copy_layout(&layout, &dest, &parsed)?;
                (dest.display().to_string(), digest_of_layout(&dest)?)
            }
            (None, Some(c)) => {
                let digest = kiln_registry_mirror::archive::push_archive(
                    c,
                    &layout,
                    &parsed.name,
                    &parsed.reference,
                )
                .await
                .with_context(|| format!("pushing {image} from {found} to {}", args.to))?;
                (
                    format!("{}/{}:{}", args.to, parsed.name, parsed.reference),
                    digest.to_string(),
                )
            }
            (None, None) => unreachable!("a destination is a directory or a registry"),
        };
        done.push(Cached {
            image: image.clone(),
            from: found.to_string(),
            to,
            digest,
        });
    }
    if !missing.is_empty() {
        bail!(
            "not found: {}; looked in {}. Build the installer with `kiln image build`, put OCI archives named like {} into a --from DIR, or name a --from-registry that holds them",
            missing.join(", "),
            sources_text(&args, store.as_deref()),
            archive_name(&missing[0]),
        );
    }
    output::print(args.output, &done, |done| {
        let rows: Vec<Vec<String>> = done
            .iter()
            .map(|c| {
                vec![
                    c.image.clone(),
                    c.from.clone(),
                    c.to.clone(),
                    c.digest.clone(),
                ]
            })
            .collect();
        output::table(&["IMAGE", "FROM", "TO", "DIGEST"], &rows)
    })
}

fn sources_text(args: &CacheArgs, store: Option<&Path>) -> String {
    let mut s: Vec<String> = args
        .from_dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    if let Some(st) = store {
        s.push(format!("image store {}", st.display()));
    }
    if let Some(r) = &args.from_registry {
        s.push(format!("registry {r}"));
    }
    s.join(", ")
}

/// Writes `layout` (an archive or a layout directory) as the archive `dest`: a directory's
/// files are packed into a tar, an archive is copied.
fn copy_layout(layout: &Path, dest: &Path, image: &ImageRef) -> anyhow::Result<()> {
    if layout.is_dir() {
        let file =
            std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        let mut tar = tar::Builder::new(file);
        tar.follow_symlinks(true);
        tar.append_dir_all(".", layout)
            .with_context(|| format!("packing {} for {}", layout.display(), image.name))?;
        tar.into_inner()
            .with_context(|| format!("writing {}", dest.display()))?;
    } else if layout != dest {
        std::fs::copy(layout, dest)
            .with_context(|| format!("copying {} to {}", layout.display(), dest.display()))?;
    }
    Ok(())
}

/// The digest of the (only or first) image in an OCI archive.
fn digest_of_layout(archive: &Path) -> anyhow::Result<String> {
    let file =
        std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        if path.file_name().is_some_and(|n| n == "index.json") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text)?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: index.json", archive.display()))?;
            return index["manifests"][0]["digest"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{}: index.json lists no image", archive.display()));
        }
    }
    bail!(
        "{} holds no index.json: not an OCI archive",
        archive.display()
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn references_get_the_runtimes_default_host() {
        let r = parse_image("kiln/installer:v1").unwrap();
        assert_eq!(
            (r.host.as_str(), r.name.as_str()),
            ("docker.io", "kiln/installer")
        );
        let r = parse_image("alpine").unwrap();
        assert_eq!(r.name.as_str(), "library/alpine");
        let r = parse_image("10.5.0.1:5000/a/b:t").unwrap();
        assert_eq!((r.host.as_str(), r.name.as_str()), ("10.5.0.1:5000", "a/b"));
        let r = parse_image("registry.k8s.io/etcd:3.5").unwrap();
        assert_eq!(r.host, "registry.k8s.io");
        assert_eq!(archive_name("ghcr.io/a/b:v1"), "ghcr.io_a_b_v1.tar");
        assert!(is_directory_destination("./cache"));
        assert!(is_directory_destination("/tmp/x"));
        assert!(!is_directory_destination("10.5.0.1:5000"));
    }

    #[test]
    fn list_has_installer_node_and_config_images() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = kiln_pki::SecretsBundle::generate().unwrap();
        let patch = kiln_config::Patch::parse(
            "machine:\n  kubelet:\n    image: ghcr.io/example/kubelet:v1.31.0\n  pods:\n  - apiVersion: v1\n    kind: Pod\n    metadata: {name: web}\n    spec:\n      containers:\n      - name: web\n        image: docker.io/library/nginx:1.27\n",
            "test",
        )
        .unwrap();
        let g = kiln_config::generate(&kiln_config::GenerateInput {
            cluster_name: "gap",
            endpoint: "https://10.5.0.1:6443",
            secrets: &secrets,
            install_disk: kiln_config::generate::DEFAULT_INSTALL_DISK,
            install_image: "ghcr.io/example/installer:v9",
            patches: &[patch],
            control_plane_patches: &[],
            worker_patches: &[],
        })
        .unwrap();
        let path = dir.path().join("cp.yaml");
        std::fs::write(&path, kiln_config::to_yaml(&g.controlplane).unwrap()).unwrap();
        let images: Vec<String> = needed(&[path.clone(), path])
            .unwrap()
            .into_iter()
            .map(|i| i.image)
            .collect();
        assert_eq!(
            images,
            [
                kiln_config::generate::DEFAULT_INSTALLER_IMAGE,
                kiln_config::generate::DEFAULT_NODE_IMAGE,
                "ghcr.io/example/installer:v9",
                "ghcr.io/example/kubelet:v1.31.0",
                "docker.io/library/nginx:1.27",
            ]
        );
    }
}
