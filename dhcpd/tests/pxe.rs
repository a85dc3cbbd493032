//! Network boot with real clients in a network namespace: a client asking with architecture 7
//! (x86-64 UEFI) gets its boot file name and next server, and fetches the file over TFTP with
//! atftp (plain RFC 1350 and with the block-size option); an iPXE client gets the boot script
//! URL; nothing outside the TFTP root can be read.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use std::time::Duration;

use common::{Lab, last_event};
use kiln_dhcpd::{BootConfig, tftp};
use kiln_test_tiers::{Tier, skip_unless};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxe_client_gets_its_boot_file_and_fetches_it_by_tftp() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(1)?;
    let root = lab.dir.path().join("tftp");
    std::fs::create_dir_all(&root)?;
    // 300 KiB of varied bytes: hundreds of blocks at either block size.
    let image: Vec<u8> = (0..300 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("ipxe.efi"), &image)?;
    std::fs::write(lab.dir.path().join("secret"), b"outside the root")?;

    let mut config = lab.config();
    config.boot = Some(BootConfig {
        next_server: None,
        files: [(0, "undionly.kpxe".to_owned()), (7, "ipxe.efi".to_owned())].into(),
        ipxe_script_url: Some("http://10.213.0.1:8080/boot.ipxe".into()),
        tftp_root: Some(root.clone()),
    });
    let server = lab.start(config)?;
    // The TFTP server opens a socket per transfer, in the network namespace of the thread
    // that runs it: run it on a thread inside the server namespace.
    let (stop_tftp, tftp_stopped) = tokio::sync::oneshot::channel::<()>();
    let netns = format!("/var/run/netns/{}", lab.server_ns);
    let tftp_task = std::thread::spawn(move || -> anyhow::Result<()> {
        nix::sched::setns(
            std::fs::File::open(netns)?,
            nix::sched::CloneFlags::CLONE_NEWNET,
        )?;
        let socket = kiln_dhcpd::daemon::bind_udp("0.0.0.0:69".parse()?, Some(common::BRIDGE))?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                tftp::serve(socket, &root, async {
                    let _ = tftp_stopped.await;
                })
                .await
            })?;
        Ok(())
    });

    let c = lab.clients[0].clone();
    let log = lab.dir.path().join("udhcpc.log");
    let script = lab.script(
        "udhcpc.sh",
        &format!(
            r#"#!/bin/sh
{{ echo "reason=$1"; echo "ip=$ip"; echo "boot_file=$boot_file"; echo "siaddr=$siaddr"; echo "--"; }} >> {log}
case "$1" in bound) ip addr replace "$ip/24" dev "$interface" ;; esac
"#,
            log = log.display()
        ),
    );
    let ask = |extra: &[&str]| {
        let mut args = vec![
            "busybox",
            "udhcpc",
            "-f",
            "-q",
            "-i",
            &c.iface,
            "-s",
            script.to_str().unwrap(),
            "-T",
            "1",
            "-t",
            "10",
        ];
        args.extend_from_slice(extra);
        lab.in_ns(&c.ns, &args)
    };
    // Option 93 = 0x0007 (x86-64 UEFI), option 60 = "PXEClient".
    let status = ask(&["-x", "0x5d:0007", "-x", "0x3c:505845436c69656e74"])
        .status()
        .await?;
    assert!(status.success());
    let bound = last_event(&log, &["bound"]).unwrap();
    assert_eq!(bound["ip"], "10.213.0.10");
    assert_eq!(bound["boot_file"], "ipxe.efi");
    assert_eq!(bound["siaddr"], "10.213.0.1");

    // Fetch it, once plain (512-byte blocks) and once with the block-size option.
    for (name, option) in [("plain", None), ("blksize", Some("blksize 1428"))] {
        let out = lab.dir.path().join(format!("fetched-{name}"));
        let out_arg = out.display().to_string();
        let mut args = vec!["atftp", "--trace", "--tftp-timeout", "1"];
        if let Some(o) = option {
            args.extend(["--option", o]);
        }
        args.extend(["-g", "-r", "ipxe.efi", "-l", &out_arg, "10.213.0.1"]);
        let result =
            tokio::time::timeout(Duration::from_secs(30), lab.in_ns(&c.ns, &args).output())
                .await??;
        assert!(
            result.status.success(),
            "atftp {name}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert!(
            std::fs::read(&out)? == image,
            "the {name} transfer differs from the file"
        );
        let trace = String::from_utf8_lossy(&result.stdout).into_owned()
            + &String::from_utf8_lossy(&result.stderr);
        if option.is_some() {
            assert!(
                trace.contains("OACK") && trace.contains("1428"),
                "no block-size OACK: {trace}"
            );
        } else {
            assert!(!trace.contains("OACK"), "{trace}");
        }
    }
    // Nothing outside the root.
    let out = lab.dir.path().join("stolen");
    let out_arg = out.display().to_string();
    let result = tokio::time::timeout(
        Duration::from_secs(30),
        lab.in_ns(
            &c.ns,
            &[
                "atftp",
                "--tftp-timeout",
                "1",
                "-g",
                "-r",
                "../secret",
                "-l",
                &out_arg,
                "10.213.0.1",
            ],
        )
        .output(),
    )
    .await??;
    assert!(!result.status.success());
    assert!(std::fs::read(&out).unwrap_or_default() != b"outside the root");

    // iPXE (user class "iPXE") gets the script URL instead.
    let status = ask(&["-x", "0x5d:0007", "-x", "0x4d:69505845"])
        .status()
        .await?;
    assert!(status.success());
    assert_eq!(
        last_event(&log, &["bound"]).unwrap()["boot_file"],
        "http://10.213.0.1:8080/boot.ipxe"
    );

    // A client that is not PXE gets no boot file.
    let status = ask(&[]).status().await?;
    assert!(status.success());
    assert_eq!(last_event(&log, &["bound"]).unwrap()["boot_file"], "");

    let _ = stop_tftp.send(());
    tftp_task.join().unwrap()?;
    server.stop().await;
    Ok(())
}
