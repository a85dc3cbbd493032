//! Real DHCP clients against the server, each in a network namespace on a bridge the test
//! makes: busybox udhcpc, ISC dhclient and dhcpcd get their static address, router, DNS
//! servers, MTU and host name; leases renew and rebind; RELEASE frees an address; an unknown
//! MAC gets nothing; a restart keeps every lease.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use common::{Lab, last_event, wait_for};
use kiln_dhcpd::Pool;
use kiln_dhcpd::lease::current_leases;
use kiln_dhcpd::server::unix_now;
use kiln_test_tiers::{Tier, skip_unless};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const WAIT: Duration = Duration::from_secs(20);

/// The script udhcpc runs: logs its environment, configures the address.
fn udhcpc_script(lab: &Lab, log: &Path) -> std::path::PathBuf {
    lab.script(
        "udhcpc.sh",
        &format!(
            r#"#!/bin/sh
{{ echo "reason=$1"; echo "ip=$ip"; echo "router=$router"; echo "dns=$dns"; echo "mtu=$mtu"
   echo "hostname=$hostname"; echo "domain=$domain"; echo "serverid=$serverid"
   echo "boot_file=$boot_file"; echo "siaddr=$siaddr"; echo "--"; }} >> {log}
case "$1" in
  bound|renew) ip addr replace "$ip/24" dev "$interface" ;;
  deconfig) ip -4 addr flush dev "$interface" ;;
esac
"#,
            log = log.display()
        ),
    )
}

fn udhcpc(lab: &Lab, client: usize, script: &Path, extra: &[&str]) -> tokio::process::Command {
    let c = &lab.clients[client];
    let mut args = vec![
        "busybox",
        "udhcpc",
        "-f",
        "-i",
        &c.iface,
        "-s",
        script.to_str().unwrap(),
        "-O",
        "mtu",
        "-O",
        "hostname",
        "-O",
        "domain",
        "-T",
        "1",
        "-A",
        "1",
    ];
    args.extend_from_slice(extra);
    lab.in_ns(&c.ns, &args)
}

fn terminate(child: &tokio::process::Child, signal: Signal) {
    kill(Pid::from_raw(child.id().unwrap() as i32), signal).unwrap();
}

fn assert_static_lease(event: &std::collections::HashMap<String, String>, ip: &str, host: &str) {
    assert_eq!(event["ip"], ip, "{event:?}");
    assert_eq!(event["router"].trim(), "10.213.0.1", "{event:?}");
    assert_eq!(event["dns"].trim(), "10.213.0.53 10.213.0.54", "{event:?}");
    assert_eq!(event["mtu"], "1400", "{event:?}");
    assert_eq!(event["hostname"], host, "{event:?}");
    assert_eq!(event["domain"], "lab.test", "{event:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udhcpc_gets_its_static_lease_rebinds_and_releases() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(1)?;
    let mut config = lab.config();
    // Under 120 s, udhcpc skips RENEWING and rebinds (broadcast) at T1 = 5 s.
    config.lease_secs = 10;
    let server = lab.start(config)?;
    let log = lab.dir.path().join("udhcpc.log");
    let script = udhcpc_script(&lab, &log);
    let child = udhcpc(&lab, 0, &script, &["-R", "-t", "20"]).spawn()?;

    let bound = wait_for("udhcpc bound", WAIT, || last_event(&log, &["bound"])).await?;
    assert_static_lease(&bound, "10.213.0.10", "node-0");
    assert_eq!(bound["serverid"], "10.213.0.1");
    assert!(lab.addresses(&lab.clients[0]).contains("10.213.0.10/24"));

    let rebound = wait_for("udhcpc rebind", WAIT, || last_event(&log, &["renew"])).await?;
    assert_eq!(rebound["ip"], "10.213.0.10");
    let leases = current_leases(&lab.state_dir(), unix_now())?;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].hostname.as_deref(), Some("node-0"));

    // -R: SIGTERM sends a RELEASE.
    terminate(&child, Signal::SIGTERM);
    wait_for("the lease to be released", WAIT, || {
        current_leases(&lab.state_dir(), unix_now())
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await?;
    let handler = server.stop().await;
    assert!(handler.table().leases().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhclient_gets_its_static_lease_renews_and_releases() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(1)?;
    let mut config = lab.config();
    config.lease_secs = 10;
    let server = lab.start(config)?;
    let c = lab.clients[0].clone();
    let dir = lab.dir.path();
    let log = dir.join("dhclient.log");
    let script = lab.script(
        "dhclient.sh",
        &format!(
            r#"#!/bin/sh
{{ echo "reason=$reason"; echo "ip=$new_ip_address"; echo "router=$new_routers"
   echo "dns=$new_domain_name_servers"; echo "mtu=$new_interface_mtu"
   echo "hostname=$new_host_name"; echo "domain=$new_domain_name"; echo "--"; }} >> {log}
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/24" dev "$interface" ;;
esac
"#,
            log = log.display()
        ),
    );
    let conf = dir.join("dhclient.conf");
    std::fs::write(
        &conf,
        "request subnet-mask, broadcast-address, routers, domain-name, domain-name-servers, \
         host-name, interface-mtu;\n",
    )?;
    let files = |extra: &[&str]| {
        let mut args = vec![
            "dhclient".to_owned(),
            "-4".into(),
            "-cf".into(),
            conf.display().to_string(),
            "-sf".into(),
            script.display().to_string(),
            "-lf".into(),
            dir.join("dhclient.leases").display().to_string(),
            "-pf".into(),
            dir.join("dhclient.pid").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(c.iface.clone());
        args
    };
    let args = files(&["-d"]);
    let _child = lab
        .in_ns(&c.ns, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;

    let bound = wait_for("dhclient bound", WAIT, || last_event(&log, &["BOUND"])).await?;
    assert_static_lease(&bound, "10.213.0.10", "node-0");
    // T1 = 5 s: a unicast renewal to the server.
    let renewed = wait_for("dhclient renew", WAIT, || last_event(&log, &["RENEW"])).await?;
    assert_eq!(renewed["ip"], "10.213.0.10");

    // `dhclient -r` stops the running client and sends a RELEASE.
    let args = files(&["-r"]);
    let status = lab
        .in_ns(&c.ns, &args.iter().map(String::as_str).collect::<Vec<_>>())
        .status()
        .await?;
    assert!(status.success());
    wait_for("the lease to be released", WAIT, || {
        current_leases(&lab.state_dir(), unix_now())
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await?;
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcpcd_gets_its_static_lease_and_renews() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(1)?;
    let mut config = lab.config();
    config.lease_secs = 10;
    let server = lab.start(config)?;
    let c = lab.clients[0].clone();
    let log = lab.dir.path().join("dhcpcd.log");
    let script = lab.script(
        "dhcpcd.sh",
        &format!(
            r#"#!/bin/sh
{{ echo "reason=$reason"; echo "ip=$new_ip_address"; echo "router=$new_routers"
   echo "dns=$new_domain_name_servers"; echo "mtu=$new_interface_mtu"
   echo "hostname=$new_host_name"; echo "domain=$new_domain_name"; echo "--"; }} >> {log}
"#,
            log = log.display()
        ),
    );
    let conf = lab.dir.path().join("dhcpcd.conf");
    std::fs::write(
        &conf,
        "option subnet_mask, routers, domain_name_servers, domain_name, host_name, interface_mtu\n\
         noarp\nnoipv4ll\n",
    )?;
    let mut child = lab
        .in_ns(
            &c.ns,
            &[
                "dhcpcd",
                "-B",
                "-4",
                "-f",
                conf.to_str().unwrap(),
                "-c",
                script.to_str().unwrap(),
                "-t",
                "20",
                &c.iface,
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let bound = wait_for("dhcpcd bound", WAIT, || last_event(&log, &["BOUND"])).await?;
    assert_static_lease(&bound, "10.213.0.10", "node-0");
    wait_for("dhcpcd to configure the address", WAIT, || {
        lab.addresses(&c).contains("10.213.0.10/24").then_some(())
    })
    .await?;
    let renewed = wait_for("dhcpcd renew", WAIT, || {
        last_event(&log, &["RENEW", "REBIND"])
    })
    .await?;
    assert_eq!(renewed["ip"], "10.213.0.10");
    // Ask dhcpcd to exit through its control socket: killing it leaves its
    // privilege-separation helpers behind.
    lab.in_ns(&c.ns, &["dhcpcd", "-4", "-x", &c.iface])
        .status()
        .await?;
    tokio::time::timeout(WAIT, child.wait()).await??;
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_mac_gets_nothing_and_released_pool_address_is_free_again() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(2)?;
    let mut config = lab.config();
    // Client 1 has no static lease, and there is no pool: it must get nothing.
    config.static_leases.truncate(1);
    let server = lab.start(config.clone())?;
    let log = lab.dir.path().join("udhcpc.log");
    let script = udhcpc_script(&lab, &log);
    let status = udhcpc(&lab, 1, &script, &["-q", "-n", "-t", "3"])
        .status()
        .await?;
    assert!(!status.success(), "udhcpc got a lease for an unknown MAC");
    assert!(last_event(&log, &["bound"]).is_none());
    let counters = server.counters.snapshot();
    assert!(counters.ignored >= 3, "{counters:?}");
    assert_eq!(counters.offers, 0, "{counters:?}");
    server.stop().await;

    // A pool of one address, without static leases: client 0 takes it, releases it
    // (udhcpc -R -q), and client 1 gets it.
    config.static_leases.clear();
    config.pool = Some(Pool {
        start: Ipv4Addr::new(10, 213, 0, 100),
        end: Ipv4Addr::new(10, 213, 0, 100),
    });
    let server = lab.start(config)?;
    let status = udhcpc(&lab, 0, &script, &["-q", "-t", "10"])
        .status()
        .await?;
    assert!(status.success());
    assert_eq!(last_event(&log, &["bound"]).unwrap()["ip"], "10.213.0.100");
    // The pool is empty for client 1 now.
    let status = udhcpc(&lab, 1, &script, &["-q", "-n", "-t", "2"])
        .status()
        .await?;
    assert!(
        !status.success(),
        "the one pool address was handed out twice"
    );
    // Client 0 asks again, and releases when told to stop (-R).
    std::fs::remove_file(&log)?;
    let child = udhcpc(&lab, 0, &script, &["-R", "-t", "10"]).spawn()?;
    wait_for("client 0 bound again", WAIT, || {
        last_event(&log, &["bound"])
    })
    .await?;
    terminate(&child, Signal::SIGTERM);
    wait_for("the release", WAIT, || {
        current_leases(&lab.state_dir(), unix_now())
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await?;
    std::fs::remove_file(&log)?;
    let status = udhcpc(&lab, 1, &script, &["-q", "-t", "10"])
        .status()
        .await?;
    assert!(status.success());
    assert_eq!(last_event(&log, &["bound"]).unwrap()["ip"], "10.213.0.100");
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_lease() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(3)?;
    let mut config = lab.config();
    config.static_leases.clear();
    config.pool = Some(Pool {
        start: Ipv4Addr::new(10, 213, 0, 100),
        end: Ipv4Addr::new(10, 213, 0, 102),
    });
    let log = lab.dir.path().join("udhcpc.log");
    let script = udhcpc_script(&lab, &log);
    let server = lab.start(config.clone())?;
    let mut first = Vec::new();
    for i in 0..2 {
        // -q without -R: exit holding the lease.
        assert!(
            udhcpc(&lab, i, &script, &["-q", "-t", "10"])
                .status()
                .await?
                .success()
        );
        first.push(last_event(&log, &["bound"]).unwrap()["ip"].clone());
    }
    assert_eq!(first, ["10.213.0.100", "10.213.0.101"]);
    server.stop().await;

    let server = lab.start(config)?;
    // A new client must not get either held address (the pool starts over at .100).
    assert!(
        udhcpc(&lab, 2, &script, &["-q", "-t", "10"])
            .status()
            .await?
            .success()
    );
    assert_eq!(last_event(&log, &["bound"]).unwrap()["ip"], "10.213.0.102");
    // The old clients get their addresses back, asking for nothing in particular.
    for (i, ip) in first.iter().enumerate() {
        lab.in_ns(
            &lab.clients[i].ns,
            &["ip", "-4", "addr", "flush", "dev", &lab.clients[i].iface],
        )
        .status()
        .await?;
        assert!(
            udhcpc(&lab, i, &script, &["-q", "-t", "10"])
                .status()
                .await?
                .success()
        );
        assert_eq!(&last_event(&log, &["bound"]).unwrap()["ip"], ip);
    }
    let handler = server.stop().await;
    assert_eq!(handler.table().leases().len(), 3);
    Ok(())
}
