//! The built-in scenarios: the files of `scenarios/builtin/`, shipped inside the binary.
//!
//! Adding one: write `builtin/NAME.yaml` and list it in [`BUILTIN`].

use crate::file::Scenario;

/// The shipped scenario files: (file name, text).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "etcd-disaster-recovery.yaml",
        include_str!("../builtin/etcd-disaster-recovery.yaml"),
    ),
    (
        "etcd-disaster-recovery-raw-copy.yaml",
        include_str!("../builtin/etcd-disaster-recovery-raw-copy.yaml"),
    ),
    (
        "control-plane-node-loss.yaml",
        include_str!("../builtin/control-plane-node-loss.yaml"),
    ),
    (
        "network-partition.yaml",
        include_str!("../builtin/network-partition.yaml"),
    ),
    (
        "node-reboot.yaml",
        include_str!("../builtin/node-reboot.yaml"),
    ),
    (
        "maintenance-mode-apply.yaml",
        include_str!("../builtin/maintenance-mode-apply.yaml"),
    ),
    (
        "etcd-maintenance.yaml",
        include_str!("../builtin/etcd-maintenance.yaml"),
    ),
    (
        "upgrade-rolling.yaml",
        include_str!("../builtin/upgrade-rolling.yaml"),
    ),
    (
        "upgrade-concurrent-control-plane.yaml",
        include_str!("../builtin/upgrade-concurrent-control-plane.yaml"),
    ),
    (
        "upgrade-bad-image.yaml",
        include_str!("../builtin/upgrade-bad-image.yaml"),
    ),
    (
        "upgrade-boot-failure.yaml",
        include_str!("../builtin/upgrade-boot-failure.yaml"),
    ),
    ("rollback.yaml", include_str!("../builtin/rollback.yaml")),
    (
        "upgrade-no-preserve.yaml",
        include_str!("../builtin/upgrade-no-preserve.yaml"),
    ),
    (
        "upgrade-staged.yaml",
        include_str!("../builtin/upgrade-staged.yaml"),
    ),
    (
        "upgrade-staged-no-preserve.yaml",
        include_str!("../builtin/upgrade-staged-no-preserve.yaml"),
    ),
    (
        "upgrade-quorum-refused.yaml",
        include_str!("../builtin/upgrade-quorum-refused.yaml"),
    ),
    (
        "kubeadm-migration.yaml",
        include_str!("../builtin/kubeadm-migration.yaml"),
    ),
    (
        "airgapped-boot.yaml",
        include_str!("../builtin/airgapped-boot.yaml"),
    ),
];

/// Every built-in scenario. The shipped files are checked by this crate's tests, so a parse
/// failure here is a build defect, reported with the file's problems.
pub fn catalog() -> Vec<Scenario> {
    BUILTIN
        .iter()
        .map(|(file, text)| {
            Scenario::parse(text, &format!("builtin:{file}"))
                .unwrap_or_else(|e| panic!("a shipped scenario is invalid: {e}"))
        })
        .collect()
}

/// The built-in scenario called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    catalog().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_files_parse_with_unique_names_matching_their_files() {
        let all = catalog();
        let mut names: Vec<_> = all.iter().map(|s| s.name.clone()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        for ((file, _), s) in BUILTIN.iter().zip(&all) {
            assert_eq!(*file, format!("{}.yaml", s.name));
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("builtin");
        let on_disk = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(
            on_disk,
            BUILTIN.len(),
            "every file of builtin/ is listed in BUILTIN"
        );
        assert!(find("network-partition").is_some_and(|s| s.needs_link_faults()));
        assert!(find("node-reboot").is_some_and(|s| !s.needs_link_faults()));
        assert!(find("rollback").is_some_and(|s| s.needs_slots()));
        assert!(find("node-reboot").is_some_and(|s| !s.needs_slots()));
        assert!(find("kubeadm-migration").is_some_and(|s| s.needs_kubeadm()));
        assert!(find("node-reboot").is_some_and(|s| !s.needs_kubeadm()));
        assert!(find("airgapped-boot").is_some_and(|s| s.needs_airgap()));
        assert!(find("node-reboot").is_some_and(|s| !s.needs_airgap()));
    }

    #[test]
    fn the_docs_show_every_shipped_file_as_it_is() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/scenarios.md"),
        )
        .unwrap_or_default();
        for (file, text) in BUILTIN {
            assert!(
                docs.contains(&format!("```yaml\n{text}```")),
                "docs/scenarios.md does not show builtin/{file} as shipped"
            );
        }
    }
}
