//! The `kiln` binary end to end: gen, validate, config contexts, completion, man pages, and
//! bad input that must give a clear error and a non-zero exit code, never a panic.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn kiln(dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("KILNCONFIG")
        .output()
        .unwrap();
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert_ne!(run.code, 101, "kiln {args:?} panicked:\n{}", run.stderr);
    run
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let r = kiln(dir, args);
    assert_eq!(r.code, 0, "kiln {args:?} failed:\n{}{}", r.stdout, r.stderr);
    r.stdout
}

fn fails(dir: &Path, args: &[&str], needles: &[&str]) -> String {
    let r = kiln(dir, args);
    assert_ne!(r.code, 0, "kiln {args:?} should have failed:\n{}", r.stdout);
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "kiln {args:?}: stderr lacks {n:?}:\n{}",
            r.stderr
        );
    }
    r.stderr
}

fn b64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

fn yaml(path: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn have_openssl() -> bool {
    kiln_test_tiers::check(module_path!(), &[kiln_test_tiers::Tier::Openssl])
}

#[test]
fn gen_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["gen", "secrets", "-o", "secrets.yaml"]);
    fails(
        d,
        &["gen", "secrets", "-o", "secrets.yaml"],
        &["already exists", "--force"],
    );
    let out = ok(
        d,
        &[
            "gen",
            "config",
            "demo",
            "https://10.5.0.1:6443",
            "--with-secrets",
            "secrets.yaml",
            "-o",
            "out",
        ],
    );
    assert!(out.contains("created out/controlplane.yaml"), "{out}");
    fails(
        d,
        &[
            "gen",
            "config",
            "demo",
            "https://10.5.0.1:6443",
            "-o",
            "out",
        ],
        &["controlplane.yaml already exists"],
    );

    for mode in ["metal", "container", "process"] {
        let out = ok(
            d,
            &[
                "validate",
                "--config",
                "out/controlplane.yaml",
                "--mode",
                mode,
            ],
        );
        assert!(out.contains(&format!("is valid for {mode} mode")), "{out}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(
        d,
        &[
            "validate",
            "-c",
            "out/worker.yaml",
            "-m",
            "process",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["warnings"][0]["path"], "machine.install");
    fails(
        d,
        &[
            "validate",
            "-c",
            "out/worker.yaml",
            "-m",
            "process",
            "--strict",
        ],
        &["not valid for process mode", "--strict"],
    );

    // The secrets given are the secrets used.
    let secrets = yaml(&d.join("secrets.yaml"));
    let cp = yaml(&d.join("out/controlplane.yaml"));
    assert_eq!(cp["cluster"]["etcd"]["ca"], secrets["certs"]["etcd"]);
    assert_eq!(cp["machine"]["token"], secrets["trustdinfo"]["token"]);
    let client = yaml(&d.join("out/kilnconfig"));
    assert_eq!(client["context"], "demo");
    assert_eq!(client["contexts"]["demo"]["endpoints"][0], "10.5.0.1");
    assert_eq!(
        client["contexts"]["demo"]["ca"],
        secrets["certs"]["os"]["crt"]
    );
}

#[test]
fn admin_certificate_verifies_with_openssl() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["gen", "config", "demo", "https://cp.example.com:6443"]);
    let ctx = &yaml(&d.join("kilnconfig"))["contexts"]["demo"];
    std::fs::write(d.join("ca.crt"), b64(ctx["ca"].as_str().unwrap())).unwrap();
    std::fs::write(d.join("admin.crt"), b64(ctx["crt"].as_str().unwrap())).unwrap();
    let out = Command::new("openssl")
        .args([
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            "ca.crt",
            "admin.crt",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let subject = Command::new("openssl")
        .args(["x509", "-in", "admin.crt", "-noout", "-subject"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&subject.stdout).contains("O = os:admin"));
}

#[test]
fn kubeadm_migration_carries_the_existing_cas() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../os/pki/tests/data/make-kubeadm-pki.sh");
    assert!(
        Command::new(script)
            .arg(d.join("pki"))
            .status()
            .unwrap()
            .success()
    );

    fails(
        d,
        &["gen", "secrets", "--from-kubernetes-pki", "pki"],
        &["--kubernetes-bootstrap-token"],
    );
    fails(
        d,
        &[
            "gen",
            "secrets",
            "--from-kubernetes-pki",
            "nope",
            "--kubernetes-bootstrap-token",
            "abcdef.0123456789abcdef",
        ],
        &["ca.crt", "missing"],
    );
    ok(
        d,
        &[
            "gen",
            "secrets",
            "--from-kubernetes-pki",
            "pki",
            "--kubernetes-bootstrap-token",
            "abcdef.0123456789abcdef",
        ],
    );
    ok(
        d,
        &[
            "gen",
            "config",
            "--with-secrets",
            "secrets.yaml",
            "migrated",
            "https://10.0.0.10:6443",
        ],
    );
    let cp = yaml(&d.join("controlplane.yaml"));
    let read = |f: &str| std::fs::read_to_string(d.join("pki").join(f)).unwrap();
    assert_eq!(
        b64(cp["cluster"]["ca"]["crt"].as_str().unwrap()),
        read("ca.crt")
    );
    assert_eq!(
        b64(cp["cluster"]["ca"]["key"].as_str().unwrap()),
        read("ca.key")
    );
    assert_eq!(
        b64(cp["cluster"]["aggregatorCA"]["crt"].as_str().unwrap()),
        read("front-proxy-ca.crt")
    );
    assert_eq!(
        b64(cp["cluster"]["etcd"]["ca"]["crt"].as_str().unwrap()),
        read("etcd/ca.crt")
    );
    assert_eq!(
        b64(cp["cluster"]["serviceAccount"]["key"].as_str().unwrap()),
        read("sa.key")
    );
    assert_eq!(cp["cluster"]["token"], "abcdef.0123456789abcdef");
    let worker = yaml(&d.join("worker.yaml"));
    assert_eq!(worker["cluster"]["ca"]["crt"], cp["cluster"]["ca"]["crt"]);
    assert_eq!(worker["cluster"]["ca"]["key"], "");
    ok(d, &["validate", "--config", "controlplane.yaml"]);
}

#[test]
fn validate_reports_unknown_fields_and_semantic_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["gen", "config", "demo", "https://10.5.0.1:6443"]);
    let text = std::fs::read_to_string(d.join("worker.yaml")).unwrap();
    std::fs::write(
        d.join("typo.yaml"),
        text.replacen(
            "  install:\n",
            "  install:\n    wipe: true\n    disks: /dev/sdb\n",
            1,
        ),
    )
    .unwrap();
    let line = std::fs::read_to_string(d.join("typo.yaml"))
        .unwrap()
        .lines()
        .position(|l| l.contains("disks"))
        .unwrap()
        + 1;
    fails(
        d,
        &["validate", "--config", "typo.yaml"],
        &[
            "machine.install",
            "unknown field `disks`",
            &format!("line {line}"),
        ],
    );

    std::fs::write(
        d.join("bad.yaml"),
        text.replace("https://10.5.0.1:6443", "tcp://10.5.0.1:6443")
            .replace("10.96.0.0/12", "10.96.0.0/33"),
    )
    .unwrap();
    let err = fails(
        d,
        &["validate", "--config", "bad.yaml"],
        &[
            "cluster.controlPlane.endpoint",
            "cluster.network.serviceSubnets[0]",
        ],
    );
    assert!(err.contains("https://HOST:6443"), "{err}");
    let r = kiln(d, &["validate", "--config", "bad.yaml", "-o", "yaml"]);
    assert_eq!(r.code, 1);
    let report: serde_yaml::Value = serde_yaml::from_str(&r.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert_eq!(report["errors"].as_sequence().unwrap().len(), 2);
}

#[test]
fn config_patches_from_flags() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("mirror.yaml"), "machine:\n  registries:\n    mirrors:\n      docker.io:\n        endpoints: [http://10.5.0.1:5000]\n").unwrap();
    ok(
        d,
        &[
            "gen",
            "config",
            "demo",
            "https://10.5.0.1:6443",
            "--config-patch",
            "@mirror.yaml",
            "--config-patch-control-plane",
            "cluster: {etcd: {extraArgs: {quota-backend-bytes: 4294967296}}}",
            "--config-patch-worker",
            r#"[{"op": "add", "path": "/machine/network/hostname", "value": "w1"}]"#,
        ],
    );
    let cp = yaml(&d.join("controlplane.yaml"));
    let w = yaml(&d.join("worker.yaml"));
    assert_eq!(cp["machine"]["registries"], w["machine"]["registries"]);
    assert_eq!(
        cp["cluster"]["etcd"]["extraArgs"]["quota-backend-bytes"],
        "4294967296"
    );
    assert_eq!(w["machine"]["network"]["hostname"], "w1");
    assert!(cp["machine"]["network"]["hostname"].is_null());

    fails(
        d,
        &[
            "gen",
            "config",
            "x",
            "https://10.5.0.1:6443",
            "-o",
            "o2",
            "--config-patch",
            r#"[{"op":"replace","path":"/machine/nope","value":1}]"#,
        ],
        &["operation #1", "/machine/nope"],
    );
    fails(
        d,
        &[
            "gen",
            "config",
            "x",
            "https://10.5.0.1:6443",
            "-o",
            "o3",
            "--config-patch",
            "@missing.yaml",
        ],
        &["missing.yaml"],
    );
    fails(
        d,
        &[
            "gen",
            "config",
            "x",
            "https://10.5.0.1:6443",
            "-o",
            "o4",
            "--config-patch",
            "machine: {network: {interfaces: [{interface: eth0, addresses: [300.1.1.1/24]}]}}",
        ],
        &[
            "machine.network.interfaces[0].addresses[0]",
            "not a valid CIDR",
        ],
    );
    fails(
        d,
        &["gen", "config", "x", "10.5.0.1:6443", "-o", "o5"],
        &["not an https URL"],
    );
    assert!(
        !d.join("o2").exists() && !d.join("o4").exists(),
        "nothing is written on failure"
    );
}

#[test]
fn client_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        d,
        &["gen", "config", "demo", "https://10.5.0.1:6443", "-o", "a"],
    );
    ok(
        d,
        &["gen", "config", "demo", "https://10.6.0.1:6443", "-o", "b"],
    );
    ok(
        d,
        &["gen", "config", "other", "https://10.7.0.1:6443", "-o", "c"],
    );
    let out = ok(d, &["config", "merge", "a/kilnconfig"]);
    assert!(out.contains("merged context \"demo\""), "{out}");
    let out = ok(d, &["config", "merge", "b/kilnconfig"]);
    assert!(
        out.contains("renamed context \"demo\" to \"demo-1\""),
        "{out}"
    );
    ok(d, &["config", "merge", "c/kilnconfig"]);
    assert!(
        d.join(".kiln/config").exists(),
        "default path is ~/.kiln/config"
    );

    let rows: serde_json::Value =
        serde_json::from_str(&ok(d, &["config", "contexts", "-o", "json"])).unwrap();
    let names: Vec<_> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["demo", "demo-1", "other"]);
    assert_eq!(rows[2]["current"], true);

    ok(d, &["config", "use-context", "demo-1"]);
    ok(d, &["config", "endpoint", "10.6.0.2", "10.6.0.3"]);
    ok(d, &["config", "node", "10.6.0.4"]);
    let info: serde_yaml::Value =
        serde_yaml::from_str(&ok(d, &["config", "info", "-o", "yaml"])).unwrap();
    assert_eq!(info["name"], "demo-1");
    assert_eq!(info["endpoints"][1], "10.6.0.3");
    assert_eq!(info["nodes"][0], "10.6.0.4");
    ok(d, &["--context", "other", "config", "node", "10.7.0.9"]);
    let table = ok(d, &["config", "contexts"]);
    assert!(
        table.lines().next().unwrap().starts_with("CURRENT   NAME"),
        "{table}"
    );
    assert!(
        table.contains("*         demo-1   10.6.0.2,10.6.0.3   10.6.0.4"),
        "{table}"
    );

    fails(
        d,
        &["config", "use-context", "nope"],
        &["\"nope\" is not defined", "demo, demo-1, other"],
    );
    ok(d, &["config", "remove", "demo-1"]);
    fails(
        d,
        &["config", "info"],
        &["no current context", "use-context"],
    );
    // An explicit file through the flag or the environment.
    ok(d, &["--kilnconfig", "a/kilnconfig", "config", "info"]);
    std::fs::write(d.join("broken"), "contexts: [1, 2]\n").unwrap();
    fails(
        d,
        &["--kilnconfig", "broken", "config", "contexts"],
        &["broken", "not a kiln client config"],
    );
}

#[test]
fn completion_and_man_pages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(d, &["completion", shell]);
        assert!(
            out.contains("validate") && out.contains("use-context"),
            "{shell}"
        );
    }
    fails(d, &["completion", "tcsh"], &["invalid value"]);
    let out = ok(d, &["docs", "man", "-o", "man"]);
    assert!(out.contains("man pages"), "{out}");
    for page in [
        "kiln.1",
        "kiln-gen.1",
        "kiln-gen-config.1",
        "kiln-config-use-context.1",
        "kiln-validate.1",
    ] {
        let text = std::fs::read_to_string(d.join("man").join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    assert!(
        std::fs::read_to_string(d.join("man/kiln-gen-config.1"))
            .unwrap()
            .contains("with\\-secrets")
    );
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty.yaml"), "").unwrap();
    std::fs::write(d.join("list.yaml"), "- 1\n- 2\n").unwrap();
    std::fs::write(d.join("binary.yaml"), [0xff, 0xfe, 0x00, 0x01]).unwrap();
    std::fs::write(
        d.join("two.yaml"),
        "version: v1alpha1\n---\nversion: v1alpha1\n",
    )
    .unwrap();
    std::fs::write(d.join("secrets.yaml"), "cluster: {}\n").unwrap();
    fails(
        d,
        &["validate", "--config", "missing.yaml"],
        &["missing.yaml"],
    );
    fails(d, &["validate", "--config", "empty.yaml"], &["empty.yaml"]);
    fails(d, &["validate", "--config", "list.yaml"], &["list.yaml"]);
    fails(
        d,
        &["validate", "--config", "binary.yaml"],
        &["binary.yaml"],
    );
    fails(
        d,
        &["validate", "--config", "two.yaml"],
        &[
            "2 v1alpha1 machine configuration documents",
            "one v1alpha1 document per file",
        ],
    );
    fails(
        d,
        &["validate", "--config", "empty.yaml", "--mode", "vm"],
        &["metal, container or process"],
    );
    fails(
        d,
        &[
            "gen",
            "config",
            "x",
            "https://10.5.0.1:6443",
            "--with-secrets",
            "secrets.yaml",
        ],
        &["secrets.yaml", "not a secrets bundle"],
    );
    fails(
        d,
        &[
            "gen",
            "config",
            "x",
            "https://10.5.0.1:6443",
            "--with-secrets",
            "nope.yaml",
        ],
        &["nope.yaml"],
    );
    fails(d, &["config", "merge", "empty.yaml"], &["is empty"]);
    fails(d, &["gen"], &["Usage"]);
    fails(d, &["frobnicate"], &["unrecognized subcommand"]);
}

/// `kiln scenario validate` and `run` on a file with three mistakes: all three reported with
/// their lines and columns, and nothing run (no cluster state appears).
#[test]
fn scenario_files_with_mistakes_report_each_and_run_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("bad.yaml"),
        "name: scen-bad\n\
         description: three mistakes\n\
         cluster:\n  nodes:\n    - role: controlplane\n\
         steps:\n  - powerOf: controlplane-1\n  - powerOff: worker-1\n  - writeKeys: {}\n",
    )
    .unwrap();
    std::fs::write(d.join("binary.yaml"), [0xff, 0xfe, 0x00, 0x01]).unwrap();
    let r = kiln(d, &["scenario", "validate", "bad.yaml"]);
    assert_ne!(r.code, 0);
    for needle in [
        "bad.yaml: 3 problem(s)",
        "bad.yaml:7:5: unknown step \"powerOf\"",
        "bad.yaml:8:15: step powerOff: the cluster has no worker-1",
        "bad.yaml:9:16: step writeKeys: missing field `count`",
    ] {
        assert!(
            r.stderr.contains(needle),
            "{needle:?} not in:\n{}",
            r.stderr
        );
    }
    assert!(r.stderr.contains("nothing was run"), "{}", r.stderr);
    let state = d.join("state");
    let r = kiln(
        d,
        &[
            "scenario",
            "run",
            "bad.yaml",
            "--state",
            &state.display().to_string(),
        ],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("bad.yaml:7:5"), "{}", r.stderr);
    assert!(!state.exists(), "a cluster was started");
    fails(
        d,
        &["scenario", "validate", "binary.yaml"],
        &["binary.yaml"],
    );
    fails(
        d,
        &["scenario", "validate", "missing.yaml"],
        &["missing.yaml"],
    );
    let builtin = ok(d, &["scenario", "show", "etcd-maintenance"]);
    std::fs::write(d.join("maint.yaml"), builtin).unwrap();
    assert!(ok(d, &["scenario", "validate", "maint.yaml"]).contains("maint.yaml: ok"));
}
