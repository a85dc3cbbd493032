//! The whole server process as `kiln dhcpd run` runs it ([`daemon::run`]): the YAML file the
//! lab writes, sockets bound to the bridge by name, DHCP and TFTP together, the lease journal
//! in the state directory, a clean stop; and the errors a user can cause.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use std::time::Duration;

use common::{BRIDGE, Lab, last_event, wait_for};
use kiln_dhcpd::daemon::{self, RunError, RunOptions};
use kiln_dhcpd::lease::current_leases;
use kiln_dhcpd::server::unix_now;
use kiln_dhcpd::{BootConfig, ConfigError};
use kiln_test_tiers::{Tier, skip_unless};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_dhcp_and_tftp_on_the_bridge_from_its_files() -> anyhow::Result<()> {
    skip_unless!(Tier::Root, Tier::Dhcp);
    let lab = Lab::new(1)?;
    let root = lab.dir.path().join("tftp");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("boot.efi"), vec![7u8; 5000])?;
    let mut config = lab.config();
    config.boot = Some(BootConfig {
        files: [(7, "boot.efi".to_owned())].into(),
        tftp_root: Some(root),
        ..Default::default()
    });
    let config_path = lab.dir.path().join("dhcpd.yaml");
    config.save(&config_path)?;
    let (listen, tftp_listen) = daemon::default_listen();
    let opts = RunOptions {
        config_path,
        state_dir: lab.state_dir(),
        interface: Some(BRIDGE.to_owned()),
        listen,
        tftp_listen,
    };
    // Sockets (the TFTP transfers' too) belong to the namespace of the thread that opens
    // them: run the daemon on a thread inside the server namespace, as `kiln dhcpd run`
    // runs in the host's.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let netns = format!("/var/run/netns/{}", lab.server_ns);
    let daemon = std::thread::spawn(move || -> Result<(), RunError> {
        nix::sched::setns(
            std::fs::File::open(netns).unwrap(),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(daemon::run(&opts, async {
            let _ = stopped.await;
        }))
    });

    let c = lab.clients[0].clone();
    let log = lab.dir.path().join("udhcpc.log");
    let script = lab.script(
        "udhcpc.sh",
        &format!(
            "#!/bin/sh\n{{ echo \"reason=$1\"; echo \"ip=$ip\"; echo \"boot_file=$boot_file\"; echo --; }} >> {}\n\
             case \"$1\" in bound) ip addr replace \"$ip/24\" dev \"$interface\" ;; esac\n",
            log.display()
        ),
    );
    let status = lab
        .in_ns(
            &c.ns,
            &[
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
                "15",
                "-x",
                "0x5d:0007",
            ],
        )
        .status()
        .await?;
    assert!(status.success());
    let bound = last_event(&log, &["bound"]).unwrap();
    assert_eq!(
        (bound["ip"].as_str(), bound["boot_file"].as_str()),
        ("10.213.0.10", "boot.efi")
    );
    let leases = current_leases(&lab.state_dir(), unix_now())?;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].mac, c.mac);

    let out = lab.dir.path().join("fetched");
    let out_arg = out.display().to_string();
    let fetched = tokio::time::timeout(
        Duration::from_secs(30),
        lab.in_ns(
            &c.ns,
            &[
                "atftp",
                "--tftp-timeout",
                "1",
                "-g",
                "-r",
                "boot.efi",
                "-l",
                &out_arg,
                "10.213.0.1",
            ],
        )
        .output(),
    )
    .await??;
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert_eq!(std::fs::read(&out)?, vec![7u8; 5000]);

    let _ = stop.send(());
    wait_for("the daemon to stop", Duration::from_secs(10), || {
        daemon.is_finished().then_some(())
    })
    .await?;
    daemon.join().unwrap()?;
    Ok(())
}

#[tokio::test]
async fn user_errors_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (listen, tftp_listen) = daemon::default_listen();
    let opts = |config_path| RunOptions {
        config_path,
        state_dir: dir.path().join("state"),
        interface: None,
        listen,
        tftp_listen,
    };
    let missing = dir.path().join("missing.yaml");
    let err = daemon::run(&opts(missing), async {}).await.unwrap_err();
    assert!(
        matches!(err, RunError::Config(ConfigError::Read { .. })),
        "{err}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "serverAddress: 10.0.0.1\nsubnet: 10.0.0.0/24\nsurprise: 1\n",
    )
    .unwrap();
    let err = daemon::run(&opts(bad), async {}).await.unwrap_err();
    assert!(
        matches!(err, RunError::Config(ConfigError::Parse { .. })),
        "{err}"
    );

    let outside = dir.path().join("outside.yaml");
    std::fs::write(
        &outside,
        "serverAddress: 10.0.0.1\nsubnet: 10.0.0.0/24\nstaticLeases:\n  - {mac: '52:54:00:00:00:01', address: 10.0.1.5}\n",
    )
    .unwrap();
    let err = daemon::run(&opts(outside), async {}).await.unwrap_err();
    assert!(
        matches!(err, RunError::Config(ConfigError::OutsideSubnet { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("10.0.1.5"), "{err}");

    let no_root = dir.path().join("no-root.yaml");
    std::fs::write(
        &no_root,
        format!(
            "serverAddress: 10.0.0.1\nsubnet: 10.0.0.0/24\nboot:\n  tftpRoot: {}\n",
            dir.path().join("nope").display()
        ),
    )
    .unwrap();
    let err = daemon::run(&opts(no_root), async {}).await.unwrap_err();
    assert!(matches!(err, RunError::TftpRoot(_)), "{err}");
}
