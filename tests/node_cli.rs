//! The `kiln` node commands against a real control-plane node (started as `kiln machined` on a
//! 127.x address, with real etcd): what users type and what they see.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct NodeProc(Child);

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kiln(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(kiln_e2e::kiln_bin())
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("KILNCONFIG")
        .output()
        .unwrap();
    let code = status.code().unwrap_or(-1);
    assert_ne!(
        code,
        101,
        "kiln {args:?} panicked: {}",
        String::from_utf8_lossy(&stderr)
    );
    (
        code,
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (code, out, err) = kiln(dir, args);
    assert_eq!(code, 0, "kiln {args:?}: {out}{err}");
    out
}

fn eventually(dir: &Path, args: &[&str], what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = kiln(dir, args);
        if code == 0 && pred(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {out}{err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn node_commands_against_a_real_node() {
    kiln_test_tiers::skip_unless!(kiln_test_tiers::Tier::Etcd);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addr = "127.31.0.2";
    ok(
        d,
        &[
            "gen",
            "config",
            "cli",
            &format!("https://{addr}:6443"),
            "-o",
            "cfg",
        ],
    );
    ok(d, &["config", "merge", "cfg/kilnconfig"]);
    let log = std::fs::File::create(d.join("node.log")).unwrap();
    let _node = NodeProc(
        Command::new(kiln_e2e::kiln_bin())
            .args([
                "machined",
                "--root",
                "node",
                "--address",
                addr,
                "--hostname",
                "cp-1",
                "--config",
                "cfg/controlplane.yaml",
            ])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let out = eventually(d, &["version"], "the API", |o| {
        o.contains("Stage:       running")
    });
    assert!(
        out.contains("Platform:    process") && out.contains("Hostname:    cp-1"),
        "{out}"
    );
    let out = eventually(d, &["services"], "etcd waiting for bootstrap", |o| {
        o.contains("Preparing")
    });
    assert!(out.starts_with("NODE"), "{out}");
    assert!(ok(d, &["bootstrap"]).contains("bootstrapping a new etcd cluster"));
    eventually(d, &["services"], "etcd healthy", |o| {
        o.lines()
            .any(|l| l.contains("etcd") && l.contains("Running") && l.contains("OK"))
    });
    let (code, _, err) = kiln(d, &["bootstrap"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("failed precondition") && err.contains("already bootstrapped"),
        "{err}"
    );

    // Several nodes: one row per node, a NODE column (the same node twice here).
    let out = ok(d, &["-n", &format!("{addr},{addr}"), "etcd", "members"]);
    assert_eq!(
        out.lines().filter(|l| l.contains("cp-1")).count(),
        2,
        "{out}"
    );
    let out = ok(d, &["etcd", "status"]);
    assert!(
        out.contains("DB SIZE") && out.contains("RAFT INDEX"),
        "{out}"
    );

    // Snapshot: the guides' output, and etcd's own tool accepts the file.
    let out = ok(d, &["etcd", "snapshot", "db.snapshot"]);
    let size = std::fs::metadata(d.join("db.snapshot")).unwrap().len();
    assert!(
        out.contains(&format!(
            "etcd snapshot saved to \"db.snapshot\" ({size} bytes)"
        )),
        "{out}"
    );
    assert!(
        out.contains("snapshot info: hash ")
            && out.contains("revision ")
            && out.contains("total keys "),
        "{out}"
    );
    let status = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "db.snapshot"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Resources.
    let json: serde_json::Value =
        serde_json::from_str(&ok(d, &["get", "machinetype", "-o", "json"])).unwrap();
    assert_eq!(json[0]["spec"], "controlplane");
    let out = ok(d, &["get", "staticpods"]);
    assert!(
        out.contains("kube-apiserver") && out.contains("StaticPod"),
        "{out}"
    );
    let out = ok(d, &["get", "etcdmembers", "-o", "yaml"]);
    assert!(out.contains("hostname: cp-1"), "{out}");
    let (code, _, err) = kiln(d, &["get", "frobs"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("unknown resource type") && err.contains("machinestatus"),
        "{err}"
    );

    // META.
    ok(d, &["meta", "write", "0xa", "network: {}"]);
    assert!(ok(d, &["get", "meta", "-o", "yaml"]).contains("network: {}"));
    ok(d, &["meta", "delete", "0xa"]);
    let (code, _, err) = kiln(d, &["meta", "delete", "0xa"]);
    assert!(code == 1 && err.contains("not set"), "{err}");

    // Files.
    let out = ok(d, &["ls", "/var/lib/etcd/member", "-d", "2"]);
    assert!(out.contains("/var/lib/etcd/member/snap/db"), "{out}");
    assert!(ok(d, &["read", "/system/state/config.yaml"]).contains("clusterName: cli"));
    ok(d, &["cp", "/var/lib/etcd/member/snap/db", "copied"]);
    assert!(std::fs::metadata(d.join("copied/db")).unwrap().len() > 0);
    let (code, _, err) = kiln(d, &["read", "/etc/passwd"]);
    assert!(code == 1 && err.contains("not on a node volume"), "{err}");

    // Logs, console, service details, kubeconfig.
    assert!(!ok(d, &["logs", "etcd", "--tail", "5"]).is_empty());
    assert!(ok(d, &["dmesg"]).contains("startServices"));
    let out = ok(d, &["service", "etcd"]);
    assert!(out.contains("[Running]: Health check successful"), "{out}");
    ok(d, &["kubeconfig", "kube.yaml"]);
    assert!(
        std::fs::read_to_string(d.join("kube.yaml"))
            .unwrap()
            .contains("current-context: admin@cli")
    );

    // apply-config: a change that needs no reboot applies live; a bad one is refused.
    let cfg = std::fs::read_to_string(d.join("cfg/controlplane.yaml")).unwrap();
    std::fs::write(
        d.join("debug.yaml"),
        cfg.replace("persist: true", "debug: true\npersist: true"),
    )
    .unwrap();
    assert!(
        ok(
            d,
            &["apply-config", "-f", "debug.yaml", "--mode", "no-reboot"]
        )
        .contains("without reboot")
    );
    std::fs::write(
        d.join("bad.yaml"),
        cfg.replace("https://127.31.0.2:6443", "http://x"),
    )
    .unwrap();
    let (code, _, err) = kiln(d, &["apply-config", "-f", "bad.yaml"]);
    assert!(
        code == 1 && err.contains("cluster.controlPlane.endpoint"),
        "{err}"
    );

    // A graceful reset of the only etcd member is refused: it would destroy the cluster.
    let (code, _, err) = kiln(d, &["reset", "--graceful"]);
    assert!(code == 1 && err.contains("only etcd member"), "{err}");
}
