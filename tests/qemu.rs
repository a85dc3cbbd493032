//! The qemu provisioner end to end (as root, under TCG where KVM does not work): `kiln image
//! build` makes the image, a 1+1 cluster of QEMU VMs boots it with machined as PID 1 on the
//! metal platform (DHCP from the lab's server, configuration from the launcher), becomes
//! healthy through the load balancer, a rebuilt image runs after a reboot (the guides'
//! development loop), and `destroy` leaves no QEMU process, tap, bridge, lease or state file
//! behind.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use kiln_e2e::{Env, assert_no_leaks, free_cidr, machined_bin, owned};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_test_tiers::{Tier, skip_unless};
use std::time::Duration;

fn state_yaml(dir: &std::path::Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(dir.join("state.yaml")).unwrap()).unwrap()
}

/// Destroys the cluster when the test ends, also when it fails halfway.
struct Destroy<'a>(&'a Env, &'a str);

impl Drop for Destroy<'_> {
    fn drop(&mut self) {
        let _ = self.0.kiln(&["cluster", "destroy", "--name", self.1]);
    }
}

#[test]
fn a_qemu_cluster_boots_machined_as_pid_1_and_destroy_leaves_nothing() {
    skip_unless!(
        Tier::Root,
        Tier::Qemu,
        Tier::Kernel,
        Tier::ImageTools,
        Tier::Etcd
    );
    let env = Env::new(None);
    let machined = machined_bin().display().to_string();
    env.ok(&["image", "build", "--no-installer", "--init", &machined]);
    let name = "qemu-e2e";
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 90);
    let _destroy = Destroy(&env, name);
    let out = env.ok(&[
        "cluster",
        "create",
        "--provisioner",
        "qemu",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "1",
        "--workers",
        "1",
        "--memory",
        "768",
        "--cpus",
        "1",
        "--wait-timeout",
        "4m",
    ]);
    assert!(out.contains("is ready"), "{out}");
    let dir = base.join(name);
    let objects = owned(&dir);
    let st = state_yaml(&dir);
    let show = env.ok(&["cluster", "show", "--name", name]);
    assert!(
        show.contains("ACCELERATOR  kvm") || show.contains("ACCELERATOR  tcg"),
        "{show}"
    );
    for i in 0..2 {
        let addr = st["nodes"][i]["address"].as_str().unwrap().to_owned();
        // PID 1 of the VM is machined on the metal platform.
        let cmdline = env.ok(&["-n", &addr, "read", "/proc/1/cmdline"]);
        assert!(
            cmdline.contains("machined") && cmdline.contains("metal"),
            "PID 1 of {addr}: {cmdline:?}"
        );
        // It got the address the lab's DHCP server leased to its MAC.
        let leases = show.contains(&addr);
        assert!(leases, "no lease for {addr} in:\n{show}");
        // Its console is the node's log.
        let node = st["nodes"][i]["name"].as_str().unwrap();
        let console = std::fs::read_to_string(dir.join(format!("{node}.log"))).unwrap();
        assert!(
            console.contains("Linux version"),
            "{node}.log has no kernel boot"
        );
    }
    let health = env.ok(&["health"]);
    assert!(
        health.contains(&format!("cluster {name} is healthy")),
        "{health}"
    );

    // The development loop (`--with-bootloader=false`, the default): a rebuilt image runs
    // after a reboot, and the node says so in its version.
    let worker = st["nodes"][1]["address"].as_str().unwrap().to_owned();
    let before = env.ok(&["-n", &worker, "version"]);
    assert!(!before.contains("vqemu-e2e-rebuilt"), "{before}");
    env.ok(&[
        "image",
        "build",
        "--no-installer",
        "--init",
        &machined,
        "--image-version",
        "qemu-e2e-rebuilt",
    ]);
    env.ok(&["-n", &worker, "reboot"]);
    until_blocking(
        "the worker to run the rebuilt image",
        Poll::every(Duration::from_secs(2), Duration::from_secs(180)),
        || {
            let out = env.kiln(&["-n", &worker, "version"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("vqemu-e2e-rebuilt") {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .unwrap();

    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&objects);
    assert!(
        !objects.links.is_empty(),
        "the state named no tap or bridge"
    );
}
