//! The qemu provisioner end to end (as root, under TCG where KVM does not work): `kiln image
//! build` makes the image, a 1+1 cluster of QEMU VMs boots it with machined as PID 1 on the
//! metal platform (DHCP from the lab's server, configuration from the launcher), becomes
//! healthy through the load balancer, a rebuilt image runs after a reboot (the guides'
//! development loop), and `destroy` leaves no QEMU process, tap, bridge, lease or state file
//! behind. A node with two NICs applies the guides' advanced networking (bond, VLANs, bridge,
//! static routes) and stays reachable when the active bond member loses its link.

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

/// `kiln -n NODE get TYPE -o json` as (id, spec) pairs, or kiln's error.
fn try_resources(
    env: &Env,
    node: &str,
    rtype: &str,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    let out = env.kiln(&["-n", node, "get", rtype, "-o", "json"]);
    if !out.status.success() {
        return Err(format!(
            "get {rtype}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    Ok(v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["metadata"]["id"].as_str().unwrap().to_owned(),
                r["spec"].clone(),
            )
        })
        .collect())
}

/// [`try_resources`], which must succeed.
fn resources(env: &Env, node: &str, rtype: &str) -> Vec<(String, serde_json::Value)> {
    try_resources(env, node, rtype).unwrap()
}

fn link<'a>(links: &'a [(String, serde_json::Value)], name: &str) -> &'a serde_json::Value {
    &links
        .iter()
        .find(|(id, _)| id == name)
        .unwrap_or_else(|| panic!("no link {name} in {links:?}"))
        .1
}

/// The guides' advanced networking in one boot of one node with two NICs: an active-backup
/// bond over both (picked by `deviceSelectors`) carrying the node's address (DHCP: the lab's
/// server leases the bond, which has eth0's MAC, the node's address) and a static route, a
/// VLAN on the bond with a static address, MTU and route, and a bridge with spanning tree over
/// a second VLAN. `kiln get links` / `get addresses` show them, and cutting the active bond
/// member's link (QMP `set_link`) moves the bond to the other NIC and the node's API still
/// answers. `kiln get routes` shows the static routes.
#[test]
fn a_qemu_node_with_two_nics_applies_a_bond_vlans_and_a_bridge_and_survives_losing_a_nic() {
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
    let name = "gnet-bond";
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 170);
    let (network, prefix) = cidr.split_once('/').unwrap();
    let network: std::net::Ipv4Addr = network.parse().unwrap();
    let gateway = std::net::Ipv4Addr::from(u32::from(network) + 1);
    let address = std::net::Ipv4Addr::from(u32::from(network) + 2);
    let patch = format!(
        r#"machine:
  network:
    interfaces:
      - interface: bond0
        dhcp: true
        routes:
          - network: 172.31.50.0/24
            gateway: {gateway}
        bond:
          mode: active-backup
          miimon: 100
          # Both NICs, picked by driver (eth0 and eth1, in name order).
          deviceSelectors: [{{driver: virtio_net, physical: true}}]
        vlans:
          - vlanId: 100
            mtu: 1400
            addresses: [172.31.100.2/24]
            routes:
              - network: 172.31.101.0/24
                gateway: 172.31.100.1
          - vlanId: 200
      - interface: br0
        addresses: [172.31.200.2/24]
        bridge:
          stp: {{enabled: true}}
          interfaces: [bond0.200]
"#,
    );
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
        "0",
        "--nics",
        "2",
        "--memory",
        "768",
        "--cpus",
        "1",
        "--config-patch",
        &patch,
        "--wait-timeout",
        "3m",
    ]);
    assert!(out.contains("is ready"), "{out}");
    let dir = base.join(name);
    let objects = owned(&dir);
    let st = state_yaml(&dir);
    let node = st["nodes"][0]["address"].as_str().unwrap().to_owned();
    assert_eq!(node, address.to_string());
    let node_name = st["nodes"][0]["name"].as_str().unwrap().to_owned();
    let extra = &st["nodes"][0]["provider"]["qemu"]["extra_nics"];
    assert_eq!(extra.as_sequence().map(Vec::len), Some(1), "{extra:?}");
    let console = std::fs::read_to_string(dir.join(format!("{node_name}.log"))).unwrap();
    assert!(
        !console.contains("configuring the network ("),
        "a part of machine.network failed:\n{console}"
    );

    let links = resources(&env, &node, "links");
    let bond = link(&links, "bond0");
    assert_eq!(bond["kind"], "bond", "{bond}");
    assert_eq!(bond["bondMode"], "active-backup", "{bond}");
    assert_eq!(bond["activePort"], "eth0", "{bond}");
    assert_eq!(bond["operState"], "up", "{bond}");
    for member in ["eth0", "eth1"] {
        assert_eq!(link(&links, member)["master"], "bond0", "{links:?}");
    }
    let vlan = link(&links, "bond0.100");
    assert_eq!(vlan["kind"], "vlan", "{vlan}");
    assert_eq!(vlan["parent"], "bond0", "{vlan}");
    assert_eq!(vlan["mtu"], 1400, "{vlan}");
    assert_eq!(link(&links, "br0")["kind"], "bridge", "{links:?}");
    assert_eq!(link(&links, "bond0.200")["master"], "br0", "{links:?}");

    let addresses: Vec<String> = resources(&env, &node, "addresses")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for want in [
        format!("bond0/{address}/{prefix}"),
        "bond0.100/172.31.100.2/24".to_owned(),
        "br0/172.31.200.2/24".to_owned(),
    ] {
        assert!(addresses.contains(&want), "no {want} in {addresses:?}");
    }
    // Static routes, and the lease's default route, through the bond and the VLAN.
    let routes: Vec<String> = resources(&env, &node, "routes")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for want in [
        format!("bond0/{gateway}/0.0.0.0/0"),
        format!("bond0/{gateway}/172.31.50.0/24"),
        "bond0.100/172.31.100.1/172.31.101.0/24".to_owned(),
    ] {
        assert!(routes.contains(&want), "no route {want} in {routes:?}");
    }
    // The boot's DHCP lease went with eth0 into the bond.
    assert!(
        !addresses.iter().any(|a| a.starts_with("eth0/")),
        "{addresses:?}"
    );

    // Pull the active member's cable: the bond fails over to eth1 and the node still answers.
    let cut = std::time::Instant::now();
    env.ok(&[
        "cluster",
        "node",
        "link-down",
        &node_name,
        "--nic",
        "0",
        "--name",
        name,
    ]);
    until_blocking(
        "the bond to fail over to eth1",
        Poll::every(Duration::from_secs(1), Duration::from_secs(60)),
        || {
            // Until the switch has learnt the MAC behind eth1 the node may not answer; it must
            // within the deadline.
            let links = try_resources(&env, &node, "links")?;
            let active = link(&links, "bond0")["activePort"].clone();
            let eth0 = link(&links, "eth0")["operState"].clone();
            if active == "eth1" && eth0 != "up" {
                Ok(())
            } else {
                Err(format!("active port {active}, eth0 {eth0}"))
            }
        },
    )
    .unwrap();
    eprintln!(
        "bond failover: the node answered through eth1 {:?} after link-down of eth0",
        cut.elapsed()
    );
    let version = env.ok(&["-n", &node, "version"]);
    assert!(version.contains("Server"), "{version}");
    let health = env.ok(&["health", "--wait-timeout", "1m"]);
    assert!(
        health.contains(&format!("cluster {name} is healthy")),
        "{health}"
    );

    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&objects);
    assert_eq!(
        objects.links.len(),
        3,
        "the bridge and both taps: {:?}",
        objects.links
    );
}
