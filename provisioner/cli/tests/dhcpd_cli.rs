//! `kiln dhcpd run` as the helper process the lab starts, on a bridge in a network namespace
//! the test makes: pidfile, a real client (udhcpc) getting its static lease, `kiln dhcpd
//! leases` listing it, SIGHUP re-reading the file, and SIGTERM stopping it and removing the
//! pidfile.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_test_tiers::{Tier, skip_unless};

/// Namespaces removed, and the helper killed, when the test ends however it ends.
struct Lab {
    namespaces: Vec<String>,
    helper: Option<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut h) = self.helper.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn dhcpd_run_serves_a_static_lease_and_stops_on_sigterm() {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id() % 100_000;
    let (server, client) = (format!("kdcli-{id}-s"), format!("kdcli-{id}-c"));
    let (peer, iface) = (format!("kdcli{id}p"), format!("kdcli{id}c"));
    let mut lab = Lab {
        namespaces: vec![],
        helper: None,
    };
    for ns in [&server, &client] {
        ip(&["netns", "add", ns]);
        lab.namespaces.push(ns.clone());
    }
    ip(&["-n", &server, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &server, "addr", "add", "10.214.0.1/24", "dev", "br0"]);
    ip(&["-n", &server, "link", "set", "br0", "up"]);
    ip(&[
        "-n", &server, "link", "add", &peer, "type", "veth", "peer", "name", &iface, "netns",
        &client,
    ]);
    ip(&["-n", &server, "link", "set", &peer, "master", "br0", "up"]);
    ip(&[
        "-n",
        &client,
        "link",
        "set",
        &iface,
        "address",
        "52:54:00:aa:bb:01",
        "up",
    ]);

    let config = dir.path().join("dhcpd.yaml");
    std::fs::write(
        &config,
        "serverAddress: 10.214.0.1\nsubnet: 10.214.0.0/24\nrouter: 10.214.0.1\nmtu: 1400\n\
         staticLeases:\n  - {mac: '52:54:00:aa:bb:01', address: 10.214.0.7, hostname: cp-1}\n",
    )
    .unwrap();
    let state = dir.path().join("dhcpd");
    let pidfile = dir.path().join("dhcpd.pid");
    let log = std::fs::File::create(dir.path().join("dhcpd.log")).unwrap();
    let kiln = env!("CARGO_BIN_EXE_kiln");
    lab.helper = Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &server,
                kiln,
                "dhcpd",
                "run",
                "--interface",
                "br0",
            ])
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_until("the pidfile", || pidfile.exists());

    let events = dir.path().join("events");
    let script = dir.path().join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $ip $hostname $mtu\" >> {}\n",
            events.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let udhcpc = || {
        Command::new("ip")
            .args([
                "netns", "exec", &client, "busybox", "udhcpc", "-f", "-q", "-i", &iface,
            ])
            .args(["-T", "1", "-t", "15", "-O", "mtu", "-O", "hostname", "-s"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    let status = udhcpc();
    assert!(
        status.success(),
        "udhcpc got no lease; see {}",
        dir.path().join("dhcpd.log").display()
    );
    let seen = std::fs::read_to_string(&events).unwrap();
    assert!(seen.contains("bound 10.214.0.7 cp-1 1400"), "{seen}");

    // The lab rewrites the file and sends SIGHUP: the next lease has the new host name.
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("cp-1", "cp-2");
    std::fs::write(&config, text).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_until("the reloaded host name", || {
        assert!(udhcpc().success());
        std::fs::read_to_string(&events)
            .unwrap()
            .contains("bound 10.214.0.7 cp-2 1400")
    });

    let out = Command::new(kiln)
        .args(["dhcpd", "leases", "-o", "json", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leases: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(leases[0]["mac"], "52:54:00:aa:bb:01");
    assert_eq!(leases[0]["address"], "10.214.0.7");
    assert_eq!(leases[0]["hostname"], "cp-2");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut helper = lab.helper.take().unwrap();
    wait_until("kiln dhcpd run to exit", || {
        helper.try_wait().unwrap().is_some()
    });
    assert!(helper.wait().unwrap().success());
    assert!(!pidfile.exists(), "the pidfile was left behind");
    assert!(Path::new(&state).join("leases.jsonl").exists());
}
