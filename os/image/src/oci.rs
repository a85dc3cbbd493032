//! The installer image: an OCI image layout (directory) with one uncompressed tar layer holding
//! the release: `usr/bin/machined`, `usr/bin/etcd`, `usr/bin/etcdctl` and `etc/os-release`
//! (what `process` and `container` nodes unpack into a boot slot) and, for `metal`, the kernel
//! and initramfs under `usr/install/amd64/` (as in the guides' installer). The OS version is in
//! the image configuration's labels and the manifest's annotations. Types from `oci-spec`;
//! `kiln image build --push` or `kiln registry push-archive DIR REF` pushes it to a registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder,
    ImageIndexBuilder, ImageManifestBuilder, MediaType, OciLayoutBuilder, Os, RootFsBuilder,
    Sha256Digest,
};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

/// The label (configuration) and annotation (manifest) that carry the OS version.
pub const VERSION_LABEL: &str = "org.opencontainers.image.version";
/// Where the payload lives inside the layer.
pub const INSTALL_DIR: &str = "usr/install/amd64";

/// Why the installer image could not be written.
#[derive(Debug, Error)]
pub enum OciError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A document could not be built or serialized.
    #[error("building the installer's {what}: {source}")]
    Spec {
        /// Which document.
        what: &'static str,
        /// The cause.
        source: oci_spec::OciSpecError,
    },
}

/// What the installer carries.
#[derive(Debug, Clone)]
pub struct InstallerInputs<'a> {
    /// The OS version.
    pub version: &'a str,
    /// machined.
    pub machined: &'a Path,
    /// etcd.
    pub etcd: &'a Path,
    /// etcdctl.
    pub etcdctl: &'a Path,
    /// The kernel (bzImage) and initramfs, for `metal`; `None` for an installer of `process`
    /// and `container` nodes only.
    pub boot: Option<(&'a Path, &'a Path)>,
}

/// The `etc/os-release` of a release.
pub fn os_release(version: &str) -> String {
    format!("NAME=\"Kiln OS\"\nID=kiln\nVERSION_ID={version}\nPRETTY_NAME=\"Kiln OS {version}\"\n")
}

/// Writes the installer image layout into the (new) directory `dir`; returns the manifest's
/// digest (`sha256:...`).
pub fn write_installer(dir: &Path, inputs: &InstallerInputs<'_>) -> Result<String, OciError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OciError::Io { path, source }
    };
    let spec = |what| move |source| OciError::Spec { what, source };
    std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io(dir))?;

    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    let mut files: Vec<(String, &Path, u32)> = vec![
        ("usr/bin/machined".into(), inputs.machined, 0o755),
        ("usr/bin/etcd".into(), inputs.etcd, 0o755),
        ("usr/bin/etcdctl".into(), inputs.etcdctl, 0o755),
    ];
    if let Some((kernel, initramfs)) = inputs.boot {
        files.push((format!("{INSTALL_DIR}/vmlinuz"), kernel, 0o644));
        files.push((format!("{INSTALL_DIR}/initramfs.zst"), initramfs, 0o644));
    }
    let mut append = |name: &str, data: &[u8], mode: u32, path: &Path| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data).map_err(io(path))
    };
    append(
        "etc/os-release",
        os_release(inputs.version).as_bytes(),
        0o644,
        dir,
    )?;
    for (name, path, mode) in &files {
        let data = std::fs::read(path).map_err(io(path))?;
        append(name, &data, *mode, path)?;
    }
    let layer = tar.into_inner().map_err(io(dir))?;
    let layer_desc = write_blob(dir, MediaType::ImageLayer, &layer)?;

    let labels = HashMap::from([(VERSION_LABEL.to_owned(), inputs.version.to_owned())]);
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .labels(labels.clone())
                .build()
                .map_err(spec("config"))?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer_desc.digest().to_string()])
                .build()
                .map_err(spec("rootfs"))?,
        )
        .build()
        .map_err(spec("configuration"))?;
    let config_json = config.to_string().map_err(spec("configuration"))?;
    let config_desc = write_blob(dir, MediaType::ImageConfig, config_json.as_bytes())?;

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_desc)
        .layers(vec![layer_desc])
        .annotations(labels)
        .build()
        .map_err(spec("manifest"))?;
    let manifest_json = manifest.to_string().map_err(spec("manifest"))?;
    let mut manifest_desc = write_blob(dir, MediaType::ImageManifest, manifest_json.as_bytes())?;
    manifest_desc.set_annotations(Some(HashMap::from([(
        "org.opencontainers.image.ref.name".to_owned(),
        inputs.version.to_owned(),
    )])));
    let digest = manifest_desc.digest().to_string();

    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()
        .map_err(spec("index"))?;
    index
        .to_file(dir.join("index.json"))
        .map_err(spec("index"))?;
    OciLayoutBuilder::default()
        .image_layout_version("1.0.0")
        .build()
        .map_err(spec("oci-layout"))?
        .to_file(dir.join("oci-layout"))
        .map_err(spec("oci-layout"))?;
    Ok(digest)
}

fn write_blob(dir: &Path, media_type: MediaType, data: &[u8]) -> Result<Descriptor, OciError> {
    let hex = hex::encode(Sha256::digest(data));
    let path = dir.join("blobs/sha256").join(&hex);
    std::fs::write(&path, data).map_err(|source| OciError::Io {
        path: path.clone(),
        source,
    })?;
    let digest: Sha256Digest = hex.parse().map_err(|source| OciError::Spec {
        what: "digest",
        source,
    })?;
    DescriptorBuilder::default()
        .media_type(media_type)
        .size(data.len() as u64)
        .digest(digest)
        .build()
        .map_err(|source| OciError::Spec {
            what: "descriptor",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

    #[test]
    fn the_layout_carries_the_payload_and_the_version() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinuz");
        let initramfs = tmp.path().join("initramfs.zst");
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&initramfs, b"initramfs").unwrap();
        let bin = tmp.path().join("bin");
        std::fs::write(&bin, b"#!/bin/true").unwrap();
        let out = tmp.path().join("installer");
        let digest = write_installer(
            &out,
            &InstallerInputs {
                version: "0.1.0-test",
                machined: &bin,
                etcd: &bin,
                etcdctl: &bin,
                boot: Some((&kernel, &initramfs)),
            },
        )
        .unwrap();

        let index = ImageIndex::from_file(out.join("index.json")).unwrap();
        assert_eq!(index.manifests()[0].digest().to_string(), digest);
        let blob = |d: &oci_spec::image::Digest| out.join("blobs/sha256").join(d.digest());
        let manifest = ImageManifest::from_file(blob(index.manifests()[0].digest())).unwrap();
        let config = ImageConfiguration::from_file(blob(manifest.config().digest())).unwrap();
        let labels = config.config().as_ref().unwrap().labels().clone().unwrap();
        assert_eq!(labels[VERSION_LABEL], "0.1.0-test");

        let layer = std::fs::read(blob(manifest.layers()[0].digest())).unwrap();
        let mut archive = tar::Archive::new(&layer[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "etc/os-release",
                "usr/bin/machined",
                "usr/bin/etcd",
                "usr/bin/etcdctl",
                "usr/install/amd64/vmlinuz",
                "usr/install/amd64/initramfs.zst"
            ]
        );
    }
}
