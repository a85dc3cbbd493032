//! Both kinds of patches apply in order, per role, and a bad patch names what failed.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use kiln_config::{GenerateInput, Patch, PatchError};
use kiln_pki::SecretsBundle;

#[test]
fn patches_apply_in_order_and_per_role() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hostname.yaml");
    std::fs::write(&file, "machine:\n  network:\n    hostname: from-file\n").unwrap();
    let secrets = SecretsBundle::generate().unwrap();
    let both = vec![
        Patch::load(&format!("@{}", file.display())).unwrap(),
        // A JSON patch after the file patch sees and replaces its value.
        Patch::load(
            r#"[{"op": "replace", "path": "/machine/network/hostname", "value": "from-json"}]"#,
        )
        .unwrap(),
    ];
    let cp = vec![
        Patch::load("cluster: {etcd: {extraArgs: {quota-backend-bytes: 4294967296}}}").unwrap(),
    ];
    let worker = vec![
        Patch::load("- {op: add, path: /machine/certSANs, value: [worker.example.com]}").unwrap(),
    ];
    let out = kiln_config::generate(&GenerateInput {
        cluster_name: "p",
        endpoint: "https://10.5.0.1:6443",
        secrets: &secrets,
        install_disk: "/dev/vda",
        install_image: "kiln/installer:v0.1.0",
        patches: &both,
        control_plane_patches: &cp,
        worker_patches: &worker,
    })
    .unwrap();
    assert_eq!(
        out.controlplane.network().hostname.as_deref(),
        Some("from-json")
    );
    assert_eq!(out.worker.network().hostname.as_deref(), Some("from-json"));
    assert!(
        out.controlplane
            .cluster
            .etcd
            .as_ref()
            .unwrap()
            .extra_args
            .contains_key("quota-backend-bytes")
    );
    assert!(out.controlplane.machine.cert_sans.is_empty());
    assert_eq!(out.worker.machine.cert_sans, ["worker.example.com"]);
}

#[test]
fn a_failing_json_operation_is_named() {
    let patch = Patch::load(r#"[{"op":"test","path":"/machine/type","value":"worker"},{"op":"remove","path":"/cluster/nothing"}]"#).unwrap();
    let err = kiln_config::patch::apply(&common::worker(), &[patch])
        .unwrap_err()
        .to_string();
    assert!(err.contains("inline patch: operation #2"), "{err}");
    assert!(err.contains("/cluster/nothing"), "{err}");
    assert!(err.contains("does not exist"), "{err}");

    let patch =
        Patch::load(r#"[{"op":"test","path":"/machine/type","value":"controlplane"}]"#).unwrap();
    let err = kiln_config::patch::apply(&common::worker(), &[patch])
        .unwrap_err()
        .to_string();
    assert!(err.contains("operation #1"), "{err}");
    assert!(err.contains("not the one the test expects"), "{err}");
}

#[test]
fn a_patch_that_breaks_the_schema_is_rejected() {
    let patch = Patch::load("machine: {network: {hostnmae: x}}").unwrap();
    let err = kiln_config::patch::apply(&common::worker(), &[patch])
        .unwrap_err()
        .to_string();
    assert!(err.contains("after applying the patches"), "{err}");
    assert!(err.contains("unknown field `hostnmae`"), "{err}");
}

#[test]
fn unreadable_or_malformed_patches() {
    let err = Patch::load("@/nonexistent/patch.yaml").unwrap_err();
    assert!(matches!(err, PatchError::Read { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/patch.yaml"));
    let err = Patch::load("machine: [unclosed").unwrap_err().to_string();
    assert!(err.contains("not valid YAML"), "{err}");
    let err = Patch::load("- {path: /machine}").unwrap_err().to_string();
    assert!(err.contains("operation #1"), "{err}");
}

#[test]
fn extension_service_configs_come_with_patches_and_replace_by_name() {
    let ext = |name: &str, greeting: &str| {
        format!(
            "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: {name}\nconfigFiles:\n  - content: {greeting}\n    mountPath: /etc/{name}.conf\n"
        )
    };
    // A patch of the machine configuration with two documents after it.
    let first = Patch::parse(
        &format!(
            "machine:\n  network:\n    hostname: ext-node\n---\n{}---\n{}",
            ext("hello", "hi"),
            ext("other", "x")
        ),
        "first",
    )
    .unwrap();
    // A patch of only a document: replaces `hello`.
    let second = Patch::parse(&ext("hello", "bye"), "second").unwrap();
    let cfg = kiln_config::patch::apply(&common::worker(), &[first, second]).unwrap();
    assert_eq!(
        cfg.machine.network.as_ref().unwrap().hostname.as_deref(),
        Some("ext-node")
    );
    let names: Vec<&str> = cfg
        .extension_service_configs
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["hello", "other"]);
    assert_eq!(
        cfg.extension_service_configs[0].config_files[0].content,
        "bye"
    );
    // The rendered file carries them and reads back the same.
    let text = kiln_config::to_yaml(&cfg).unwrap();
    assert_eq!(kiln_config::from_yaml(&text).unwrap(), cfg);

    let err = Patch::parse("machine: {}\n---\ncluster: {}\n", "two")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("two patches of the machine configuration"),
        "{err}"
    );
    let err = Patch::parse(
        "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: a\nfiles: []\n",
        "typo",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown field `files`"), "{err}");
}
