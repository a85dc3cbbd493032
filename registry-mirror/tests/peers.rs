//! Real clients no one here wrote: `skopeo` copies multi-layer images (OCI and Docker formats,
//! over HTTP and HTTPS) into the registry and back out with identical digests, and reads the
//! archives `export` writes; Docker Engine (Debian's `docker.io`, started here) pulls through
//! the mirror, whose upstream is Debian's `docker-registry`, seeded with skopeo.
//!
//! Each test names its tiers (`skip_unless!`): a missing peer prints "skipped: <reason>", or
//! fails where `scripts/test` made the tier required; `scripts/install-deps` installs them.
#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use common::{TestRegistry, bytes};
use kiln_registry_mirror::archive::{self, ImageFormat, OciLayout};
use kiln_registry_mirror::client::{ClientConfig, RegistryClient};
use kiln_registry_mirror::reference::{Digest, Reference, RepoName};
use kiln_registry_mirror::{ApiConfig, Mirror, UpstreamConfig};
use kiln_test_tiers::{Tier, skip_unless};

/// Runs a command, failing with its output when it fails.
async fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn skopeo(args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["--insecure-policy"];
    all.extend_from_slice(args);
    run("skopeo", &all).await
}

/// A three-layer image with files of a few hundred KiB, in a new layout under `dir`.
fn build(dir: &Path, format: ImageFormat, seed: u64) -> anyhow::Result<(OciLayout, Digest)> {
    let layout = OciLayout::create(dir)?;
    let layers: Vec<Vec<(String, Vec<u8>)>> = (0..3)
        .map(|i| {
            vec![
                (
                    format!("layer{i}/data.bin"),
                    bytes(seed * 10 + i, 200_000 + i as usize * 1000),
                ),
                (
                    format!("layer{i}/hello.txt"),
                    format!("hello from layer {i}\n").into_bytes(),
                ),
            ]
        })
        .collect();
    let desc = archive::build_image(&layout, &layers, format, "v1")?;
    Ok((layout, desc.digest()?))
}

/// Writes the image `digest` of `layout` as a skopeo `dir:` directory (manifest.json and one
/// file per blob): skopeo's `oci:` transport only lists OCI media types, so images with Docker
/// media types enter skopeo this way.
fn layout_to_dir(layout: &OciLayout, digest: &Digest, out: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("version"), "Directory Transport Version: 1.1\n")?;
    let manifest = layout.read_blob(digest)?;
    let parsed = kiln_registry_mirror::manifest::ParsedManifest::parse(&manifest, None)?;
    for b in &parsed.blobs {
        let d = b.digest()?;
        std::fs::copy(layout.blob_path(&d), out.join(d.hex()))?;
    }
    std::fs::write(out.join("manifest.json"), manifest)?;
    Ok(format!("dir:{}", out.display()))
}

fn oci_index_digest(dir: &Path) -> anyhow::Result<String> {
    let layout = OciLayout::open(dir)?;
    let index = layout.index()?;
    ensure!(
        index.len() == 1,
        "expected one image in {}, found {}",
        dir.display(),
        index.len()
    );
    Ok(index[0].digest.clone())
}

async fn registry_digest(url: &str, name: &str, reference: &str) -> anyhow::Result<String> {
    let r = reqwest::Client::new()
        .head(format!("{url}/v2/{name}/manifests/{reference}"))
        .header("Accept", kiln_registry_mirror::manifest::ACCEPT_ALL)
        .send()
        .await?;
    ensure!(
        r.status().is_success(),
        "HEAD {name}:{reference}: {}",
        r.status()
    );
    Ok(r.headers()["docker-content-digest"].to_str()?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_oci_and_docker_images_in_and_out() -> anyhow::Result<()> {
    skip_unless!(Tier::Skopeo);
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let host = reg.addr.to_string();
    let tmp = tempfile::tempdir()?;

    // OCI format: in, out, identical digests for the manifest and every blob.
    let (src, digest) = build(&tmp.path().join("oci-src"), ImageFormat::Oci, 1)?;
    let src_ref = format!("oci:{}:v1", src.dir().display());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &src_ref,
        &format!("docker://{host}/kiln/oci:v1"),
    ])
    .await?;
    assert_eq!(
        registry_digest(&reg.url, "kiln/oci", "v1").await?,
        digest.as_str()
    );
    let out = tmp.path().join("oci-out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{host}/kiln/oci:v1"),
        &format!("oci:{}:v1", out.display()),
    ])
    .await?;
    assert_eq!(oci_index_digest(&out)?, digest.as_str());
    for entry in std::fs::read_dir(src.dir().join("blobs/sha256"))? {
        let name = entry?.file_name();
        let copied = std::fs::read(out.join("blobs/sha256").join(&name))
            .context("blob missing after the round trip")?;
        assert_eq!(Digest::of(&copied).hex(), name.to_string_lossy());
    }
    let inspect = skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{host}/kiln/oci:v1"),
    ])
    .await?;
    let inspect: serde_json::Value = serde_json::from_str(&inspect)?;
    assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(3));

    // Docker schema 2: an image built with Docker media types, in and out through `dir:`.
    let (dsrc, ddigest) = build(&tmp.path().join("docker-src"), ImageFormat::Docker, 2)?;
    let dsrc_ref = layout_to_dir(&dsrc, &ddigest, &tmp.path().join("docker-src-dir"))?;
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &dsrc_ref,
        &format!("docker://{host}/kiln/docker:v1"),
    ])
    .await?;
    let pushed = registry_digest(&reg.url, "kiln/docker", "v1").await?;
    assert_eq!(pushed, ddigest.as_str());
    let r = reqwest::get(format!("{}/v2/kiln/docker/manifests/v1", reg.url)).await?;
    assert_eq!(
        r.headers()["content-type"],
        kiln_registry_mirror::manifest::DOCKER_MANIFEST
    );
    let dout = tmp.path().join("docker-out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{host}/kiln/docker:v1"),
        &format!("dir:{}", dout.display()),
    ])
    .await?;
    let manifest = std::fs::read(dout.join("manifest.json"))?;
    assert_eq!(Digest::of(&manifest).as_str(), pushed);
    // And back in again under another name, by way of the `dir:` copy: same digest.
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &format!("dir:{}", dout.display()),
        &format!("docker://{host}/kiln/docker2:v1"),
    ])
    .await?;
    assert_eq!(
        registry_digest(&reg.url, "kiln/docker2", "v1").await?,
        pushed
    );

    // Conversion OCI -> Docker by skopeo is accepted too (a new digest, as skopeo rewrites it).
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &src_ref,
        &format!("docker://{host}/kiln/converted:v1"),
    ])
    .await?;
    let r = reqwest::get(format!("{}/v2/kiln/converted/manifests/v1", reg.url)).await?;
    assert_eq!(
        r.headers()["content-type"],
        kiln_registry_mirror::manifest::DOCKER_MANIFEST
    );

    // Archives: what `export` writes, skopeo reads with the same digest; what skopeo writes
    // as an oci-archive, `push_archive` pushes with the same digest.
    let client = RegistryClient::new(ClientConfig::new(reg.url.parse()?))?;
    let name: RepoName = "kiln/oci".parse()?;
    let tag: Reference = "v1".parse()?;
    let exported = tmp.path().join("export.tar");
    let d = archive::export(&client, &name, &tag, &exported).await?;
    assert_eq!(d, digest);
    let inspect = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}", exported.display()),
    ])
    .await?;
    assert_eq!(Digest::of(inspect.as_bytes()), digest);
    let from_skopeo = tmp.path().join("skopeo.tar");
    skopeo(&[
        "copy",
        &dsrc_ref,
        &format!("oci-archive:{}:v1", from_skopeo.display()),
    ])
    .await?;
    // (skopeo rewrites the Docker manifest as OCI for an oci-archive; take its digest.)
    let raw = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci-archive:{}", from_skopeo.display()),
    ])
    .await?;
    let archived = Digest::of(raw.as_bytes());
    let d =
        archive::push_archive(&client, &from_skopeo, &"kiln/from-archive".parse()?, &tag).await?;
    assert_eq!(d, archived);
    assert_eq!(
        registry_digest(&reg.url, "kiln/from-archive", "v1").await?,
        archived.as_str()
    );
    let out = tmp.path().join("from-archive-out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--preserve-digests",
        &format!("docker://{host}/kiln/from-archive:v1"),
        &format!("oci:{}:v1", out.display()),
    ])
    .await?;
    assert_eq!(oci_index_digest(&out)?, archived.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copies_over_https() -> anyhow::Result<()> {
    skip_unless!(Tier::Skopeo);
    let tmp = tempfile::tempdir()?;
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])?;
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    std::fs::write(certs.join("ca.crt"), ck.cert.pem())?;
    let (cert, key) = (tmp.path().join("tls.crt"), tmp.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    let tls = kiln_registry_mirror::server::tls_acceptor(&cert, &key)?;
    let reg = TestRegistry::start_at(
        &tmp.path().join("root"),
        ApiConfig::default(),
        None,
        Some(tls),
    )
    .await;
    let (src, digest) = build(&tmp.path().join("src"), ImageFormat::Oci, 3)?;
    let certs = certs.display().to_string();
    let dest = format!("docker://{}/kiln/tls:v1", reg.addr);
    skopeo(&[
        "copy",
        "--dest-cert-dir",
        &certs,
        "--preserve-digests",
        &format!("oci:{}:v1", src.dir().display()),
        &dest,
    ])
    .await?;
    let raw = skopeo(&["inspect", "--raw", "--cert-dir", &certs, &dest]).await?;
    assert_eq!(Digest::of(raw.as_bytes()), digest);
    // Without the CA, skopeo refuses the certificate: TLS is really verified.
    assert!(skopeo(&["inspect", "--raw", &dest]).await.is_err());
    Ok(())
}

/// A child process killed (and waited for) when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child })
    }

    /// Stops it with SIGTERM and waits (bounded) for it to exit; SIGKILL after the deadline.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check().await {
        ensure!(
            Instant::now() < deadline,
            "{what} did not become ready within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Starts Debian's docker-registry on a free loopback port with its storage in `dir`.
async fn start_docker_registry(dir: &Path) -> anyhow::Result<(Daemon, String)> {
    let port = free_port()?;
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )?;
    let d = Daemon::spawn(
        "docker-registry",
        Command::new("docker-registry").arg("serve").arg(&config),
        &dir.join("docker-registry.log"),
    )?;
    let url = format!("http://127.0.0.1:{port}");
    let probe = format!("{url}/v2/");
    wait_for("docker-registry", Duration::from_secs(30), async || {
        reqwest::get(&probe)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await?;
    Ok((d, url))
}

fn docker_cmd(sock: &str) -> Vec<String> {
    vec!["-H".into(), format!("unix://{sock}")]
}

async fn docker(sock: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = docker_cmd(sock);
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    // Debian's client matches Debian's engine; prefer it over any other `docker` on PATH.
    let bin = if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    run(bin, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_the_mirror_from_docker_registry() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Docker, Tier::Skopeo);
    let tmp = tempfile::Builder::new().prefix("kiln-docker-").tempdir()?;
    let base = tmp.path();

    // The upstream: Debian's docker-registry, seeded with skopeo.
    std::fs::create_dir_all(base.join("upstream"))?;
    let (mut upstream, upstream_url) = start_docker_registry(&base.join("upstream")).await?;
    let (src, src_digest) = build(&base.join("src"), ImageFormat::Docker, 4)?;
    let src_ref = layout_to_dir(&src, &src_digest, &base.join("src-dir"))?;
    let upstream_host = upstream_url.trim_start_matches("http://").to_owned();
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--preserve-digests",
        &src_ref,
        &format!("docker://{upstream_host}/kilntest/hello:v1"),
    ])
    .await?;
    let upstream_digest = registry_digest(&upstream_url, "kilntest/hello", "v1").await?;
    assert_eq!(upstream_digest, src_digest.as_str());

    // The mirror, with docker.io served by that upstream.
    let mirror = Mirror::new(
        vec![UpstreamConfig::parse(&format!("docker.io={upstream_url}"))?],
        None,
        Duration::from_secs(3600),
    )?;
    let reg = TestRegistry::start_at(
        &base.join("mirror"),
        ApiConfig::default(),
        Some(mirror),
        None,
    )
    .await;

    // Docker Engine, started here, with registry-mirrors pointing at the mirror.
    let sock = base.join("docker.sock").display().to_string();
    let daemon_json = base.join("daemon.json");
    std::fs::write(
        &daemon_json,
        serde_json::json!({ "registry-mirrors": [reg.url] }).to_string(),
    )?;
    // Its own default bridge: with `--bridge=none` dockerd would delete the host's docker0.
    // Declared before the engine, so it is deleted after the engine stopped.
    let engine_bridge =
        kiln_test_tiers::dockerd::EngineBridge::create().map_err(anyhow::Error::msg)?;
    let mut dockerd = Daemon::spawn(
        "dockerd",
        Command::new("dockerd").args([
            "--config-file",
            &daemon_json.display().to_string(),
            "--data-root",
            &base.join("data").display().to_string(),
            "--exec-root",
            &base.join("exec").display().to_string(),
            "--pidfile",
            &base.join("docker.pid").display().to_string(),
            "-H",
            &format!("unix://{sock}"),
            "--iptables=false",
            "--ip6tables=false",
            &engine_bridge.flag(),
            "--storage-driver=vfs",
        ]),
        &base.join("dockerd.log"),
    )?;
    let ready = wait_for("dockerd", Duration::from_secs(60), async || {
        docker(&sock, &["version"]).await.is_ok()
    })
    .await;
    if let Err(e) = ready {
        let log = std::fs::read_to_string(base.join("dockerd.log")).unwrap_or_default();
        bail!("{e}\n--- dockerd.log ---\n{log}");
    }
    let info = docker(
        &sock,
        &["info", "--format", "{{json .RegistryConfig.Mirrors}}"],
    )
    .await?;
    assert!(
        info.contains(&reg.url),
        "dockerd does not use the mirror: {info}"
    );

    // Cold pull: through the mirror, from the upstream.
    docker(&sock, &["pull", "kilntest/hello:v1"]).await?;
    let digests = docker(
        &sock,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "kilntest/hello:v1",
        ],
    )
    .await?;
    assert!(
        digests.contains(&upstream_digest),
        "{digests} lacks {upstream_digest}"
    );
    let stats = &reg
        .registry
        .mirror
        .as_ref()
        .map(|m| &m.stats)
        .context("mirror")?;
    let blob_fetches = stats.upstream_blob_fetches.load(Ordering::Relaxed);
    assert_eq!(
        blob_fetches, 4,
        "three layers and a config come from the upstream once"
    );
    assert!(
        reg.count(
            |r| r.starts_with("GET /v2/library/kilntest/hello/manifests/")
                || r.starts_with("GET /v2/kilntest/hello/manifests/")
        ) >= 1
    );

    // Warm pull with the upstream gone: served from the cache.
    docker(&sock, &["rmi", "kilntest/hello:v1"]).await?;
    upstream.stop();
    ensure!(
        reqwest::get(format!("{upstream_url}/v2/")).await.is_err(),
        "upstream still answers"
    );
    docker(&sock, &["pull", "kilntest/hello:v1"]).await?;
    assert_eq!(
        stats.upstream_blob_fetches.load(Ordering::Relaxed),
        blob_fetches
    );
    let digests = docker(
        &sock,
        &[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            "kilntest/hello:v1",
        ],
    )
    .await?;
    assert!(digests.contains(&upstream_digest), "{digests}");
    // The image's files are really there: export the image's filesystem and look.
    let saved = base.join("saved.tar");
    docker(
        &sock,
        &[
            "save",
            "-o",
            &saved.display().to_string(),
            "kilntest/hello:v1",
        ],
    )
    .await?;
    ensure!(
        std::fs::metadata(&saved)?.len() > 600_000,
        "saved image is too small"
    );

    dockerd.stop();
    let _ = std::fs::remove_dir_all(base.join("data"));
    Ok(())
}
