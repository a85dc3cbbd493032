//! Helpers shared by the integration tests of kiln-config.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_config::{GenerateInput, GeneratedConfigs, MachineConfig};
use kiln_pki::SecretsBundle;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// One secrets bundle and one generated pair of documents for the whole test binary.
pub fn generated() -> &'static GeneratedConfigs {
    static GENERATED: OnceLock<GeneratedConfigs> = OnceLock::new();
    GENERATED.get_or_init(|| {
        let secrets = SecretsBundle::generate().expect("secrets");
        kiln_config::generate(&GenerateInput {
            cluster_name: "test",
            endpoint: "https://10.5.0.1:6443",
            secrets: &secrets,
            install_disk: "/dev/vda",
            install_image: "kiln/installer:v0.1.0",
            patches: &[],
            control_plane_patches: &[],
            worker_patches: &[],
        })
        .expect("generate")
    })
}

pub fn controlplane() -> MachineConfig {
    generated().controlplane.clone()
}

pub fn worker() -> MachineConfig {
    generated().worker.clone()
}

/// The control-plane document as YAML with `edit` applied to its text form.
pub fn controlplane_yaml() -> String {
    kiln_config::to_yaml(&controlplane()).expect("render")
}
