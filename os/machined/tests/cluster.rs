//! machined end to end, unprivileged: nodes are processes on 127.x addresses running real etcd.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod support;

use std::time::Duration;

use futures::StreamExt as _;
use kiln_os_api::pb;
use kiln_os_api::wait::{Poll, until};
use kiln_pki::{ROLE_ADMIN, ROLE_OPERATOR, ROLE_READER};
use kiln_test_tiers::Tier;
use support::{EXIT_OFF, Lab, eventually};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_control_plane_nodes_bootstrap_once() {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let mut lab = Lab::new(21);
    for _ in 0..3 {
        lab.start(Some("controlplane.yaml"));
    }
    lab.bootstrap_and_wait(0, &[0, 1, 2]).await;

    // A second bootstrap fails cleanly, on the bootstrapped node and on a joined one.
    for n in [0, 1] {
        let mut c = lab.client(n, ROLE_ADMIN).await;
        let err = c
            .bootstrap(pb::BootstrapRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("already bootstrapped"),
            "{}",
            err.message()
        );
    }

    // One endpoint reaches every node: node 0 forwards to the others and merges the answers.
    let mut c = lab.client(0, ROLE_READER).await;
    let nodes: Vec<String> = (0..3).map(|i| lab.address(i).to_string()).collect();
    let resp = c
        .etcd_status(kiln_os_api::client::request(pb::Empty {}, &nodes))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.messages.len(), 3);
    let leaders: std::collections::BTreeSet<u64> = resp
        .messages
        .iter()
        .map(|m| m.member_status.as_ref().unwrap().leader)
        .collect();
    assert_eq!(
        leaders.len(),
        1,
        "all members agree on the leader: {resp:?}"
    );
    for (m, n) in resp.messages.iter().zip(&nodes) {
        assert_eq!(&m.metadata.as_ref().unwrap().hostname, n);
        assert!(m.metadata.as_ref().unwrap().error.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_certificates_are_enforced() {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let mut lab = Lab::new(22);
    lab.start(Some("controlplane.yaml"));
    let mut reader = lab.client(0, ROLE_READER).await;
    reader.version(pb::Empty {}).await.unwrap();
    reader.service_list(pb::Empty {}).await.unwrap();
    let err = reader.reset(pb::ResetRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("os:admin"), "{}", err.message());
    let err = reader
        .apply_configuration(pb::ApplyConfigurationRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = reader.reboot(pb::Empty {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // An operator may reboot-level operations but not reset or read the machine config secrets.
    let mut operator = lab.client(0, ROLE_OPERATOR).await;
    let err = operator
        .reset(pb::ResetRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mc = operator
        .get(pb::GetRequest {
            r#type: "machineconfig".into(),
            id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let spec = &mc.messages[0].resources[0].spec;
    assert!(
        spec.contains("******") && !spec.contains(&lab.configs.controlplane.machine.token),
        "secrets are redacted below os:admin"
    );
    let mut admin = lab.client(0, ROLE_ADMIN).await;
    let mc = admin
        .get(pb::GetRequest {
            r#type: "machineconfig".into(),
            id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        mc.messages[0].resources[0]
            .spec
            .contains(&lab.configs.controlplane.machine.token)
    );

    // No client certificate: refused.
    let addr = lab.address(0).to_string();
    let ch = kiln_os_api::client::connect_insecure(&addr).await;
    let refused = match ch {
        Err(_) => true,
        Ok(ch) => kiln_os_api::client::machine_client(ch)
            .version(pb::Empty {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without certificate must be refused");

    // A certificate from another CA: refused.
    let other = kiln_pki::SecretsBundle::generate()
        .unwrap()
        .os_ca()
        .unwrap();
    let leaf = other
        .issue(&kiln_pki::LeafRequest::client("intruder", ROLE_ADMIN))
        .unwrap();
    let creds = kiln_os_api::client::Credentials {
        ca_pem: lab.credentials(ROLE_ADMIN).ca_pem,
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    };
    let refused = match kiln_os_api::client::connect(&addr, &creds).await {
        Err(_) => true,
        Ok(ch) => kiln_os_api::client::machine_client(ch)
            .version(pb::Empty {})
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a certificate not signed by the OS CA must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_mode_accepts_insecure_apply_and_boots() {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let mut lab = Lab::new(23);
    lab.start(None);
    let addr = lab.address(0).to_string();
    let mut c = eventually("the maintenance API", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move {
            let ch = kiln_os_api::client::connect_insecure(&addr)
                .await
                .map_err(|e| e.to_string())?;
            let mut c = kiln_os_api::client::machine_client(ch);
            let v = c
                .version(pb::Empty {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            if v.messages[0].maintenance {
                Ok(c)
            } else {
                Err("not in maintenance".into())
            }
        }
    })
    .await;
    let err = c.service_list(pb::Empty {}).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("maintenance mode"),
        "{}",
        err.message()
    );
    // An invalid document is refused with the reason; nothing changes.
    let err = c
        .apply_configuration(pb::ApplyConfigurationRequest {
            data: b"version: v1alpha1\nmachine: {type: worker}\ncluster: {}\n".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("cluster.controlPlane.endpoint"),
        "{}",
        err.message()
    );

    let data = std::fs::read(lab.dir.path().join("controlplane.yaml")).unwrap();
    let resp = c
        .apply_configuration(pb::ApplyConfigurationRequest {
            data,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        resp.messages[0].summary.contains("leaves maintenance mode"),
        "{resp:?}"
    );
    // Now the node answers with mutual TLS only, and boots on to a bootstrappable etcd.
    lab.bootstrap_and_wait(0, &[0]).await;
}

/// Writes `n` keys and returns them.
async fn write_keys(lab: &Lab, nodes: &[usize], prefix: &str, n: usize) -> Vec<String> {
    let mut etcd = lab.etcd(nodes).await;
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}/{i:04}");
        etcd.put(key.clone(), format!("value-{i}"), None)
            .await
            .unwrap();
        keys.push(key);
    }
    keys
}

async fn missing_keys(lab: &Lab, nodes: &[usize], keys: &[String]) -> Vec<String> {
    let mut etcd = lab.etcd(nodes).await;
    let mut missing = Vec::new();
    for k in keys {
        let r = etcd.get(k.as_str(), None).await.unwrap();
        if r.kvs().is_empty() {
            missing.push(k.clone());
        }
    }
    missing
}

async fn snapshot(
    c: &mut kiln_os_api::pb::machine_service_client::MachineServiceClient<
        tonic::transport::Channel,
    >,
) -> (Vec<u8>, pb::SnapshotInfo) {
    let mut stream = c.etcd_snapshot(pb::Empty {}).await.unwrap().into_inner();
    let mut data = Vec::new();
    let mut info = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if chunk.info.is_some() {
            info = chunk.info;
        }
        data.extend_from_slice(&chunk.bytes);
    }
    (data, info.unwrap())
}

async fn upload(
    c: &mut kiln_os_api::pb::machine_service_client::MachineServiceClient<
        tonic::transport::Channel,
    >,
    data: &[u8],
) {
    c.etcd_recover(futures::stream::iter(chunks(data)))
        .await
        .unwrap();
}

/// A snapshot as upload chunks.
fn chunks(data: &[u8]) -> Vec<pb::DataChunk> {
    data.chunks(256 * 1024)
        .map(|b| pb::DataChunk {
            metadata: None,
            bytes: b.to_vec(),
        })
        .collect()
}

/// `reset --graceful=false --reboot --system-labels-to-wipe=EPHEMERAL` on `nodes`, one after
/// the other (quorum is gone after the first, so not graceful).
async fn reset_ephemeral(lab: &Lab, nodes: &[usize]) {
    for &i in nodes {
        let mut c = lab.client(i, ROLE_ADMIN).await;
        c.reset(pb::ResetRequest {
            graceful: false,
            reboot: true,
            system_labels_to_wipe: vec!["EPHEMERAL".into()],
        })
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_wipe_and_recover_keeps_every_key() {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let mut lab = Lab::new(24);
    for _ in 0..3 {
        lab.start(Some("controlplane.yaml"));
    }
    lab.bootstrap_and_wait(0, &[0, 1, 2]).await;
    let keys = write_keys(&lab, &[0, 1, 2], "/dr", 300).await;

    let mut c0 = lab.client(0, ROLE_ADMIN).await;
    let (data, info) = snapshot(&mut c0).await;
    assert!(info.total_keys >= 300, "{info:?}");
    // etcd's own tool accepts the file.
    let file = lab.dir.path().join("db.snapshot");
    std::fs::write(&file, &data).unwrap();
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["hash"].as_u64().unwrap(), u64::from(info.hash));

    // Wipe EPHEMERAL everywhere (quorum is gone after the first; not graceful) and reboot.
    reset_ephemeral(&lab, &[0, 1, 2]).await;
    for i in 0..3 {
        lab.wait_exit(i, kiln_os_api::contract::EXIT_REBOOT, 1)
            .await;
    }
    let mut c0 = lab.client(0, ROLE_ADMIN).await;
    lab.wait_etcd_preparing(&c0).await;

    // A snapshot whose integrity hash is broken is refused unless the check is skipped.
    let mut corrupt = data.clone();
    let n = corrupt.len();
    corrupt[n - 1] ^= 0xff;
    upload(&mut c0, &corrupt).await;
    let err = c0
        .bootstrap(pb::BootstrapRequest {
            recover_etcd: true,
            recover_skip_hash_check: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("--recover-skip-hash-check"),
        "{}",
        err.message()
    );

    upload(&mut c0, &data).await;
    c0.bootstrap(pb::BootstrapRequest {
        recover_etcd: true,
        recover_skip_hash_check: false,
    })
    .await
    .unwrap();
    lab.wait_members(&[0, 1, 2]).await;
    let missing = missing_keys(&lab, &[0, 1, 2], &keys).await;
    assert!(
        missing.is_empty(),
        "{} acknowledged keys lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Sends `call` to node `i` (a new connection each time: the node reboots under it) until it
/// answers; only "unavailable" (the node is still resetting, or not back yet) is retried, and
/// any other refusal fails the test with the node's answer.
async fn while_unavailable<T, F, Fut>(lab: &Lab, i: usize, what: &str, call: F) -> T
where
    F: Fn(
        kiln_os_api::pb::machine_service_client::MachineServiceClient<tonic::transport::Channel>,
    ) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let creds = lab.credentials(ROLE_ADMIN);
    let addr = lab.address(i).to_string();
    let seen = std::sync::Mutex::new(Vec::new());
    let result = until(
        what,
        Poll::every(Duration::from_millis(200), Duration::from_secs(60)),
        || {
            let (creds, addr, call, seen) = (creds.clone(), addr.clone(), &call, &seen);
            async move {
                let ch = kiln_os_api::client::connect(&addr, &creds)
                    .await
                    .map_err(|e| e.to_string())?;
                match call(kiln_os_api::client::machine_client(ch)).await {
                    Ok(v) => Ok(v),
                    Err(s) if s.code() == Code::Unavailable => {
                        seen.lock().unwrap().push(s.message().to_owned());
                        Err(s.message().to_owned())
                    }
                    Err(s) => panic!("{what}: refused with {:?}: {}", s.code(), s.message()),
                }
            }
        },
    )
    .await;
    match result {
        Ok(v) => v,
        Err(e) => panic!("{e}; answers: {:?}", seen.lock().unwrap()),
    }
}

/// The guides' sequence back to back: `reset --graceful=false --reboot
/// --system-labels-to-wipe=EPHEMERAL` on every control-plane node, then at once `bootstrap
/// --recover-from`. The upload must not be refused because the wipe is still running ("etcd
/// has data"): the node says it is still resetting (unavailable, retried) until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_right_after_reset_keeps_every_key() {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let mut lab = Lab::new(26);
    for _ in 0..3 {
        lab.start(Some("controlplane.yaml"));
    }
    lab.bootstrap_and_wait(0, &[0, 1, 2]).await;
    let keys = write_keys(&lab, &[0, 1, 2], "/at-once", 200).await;
    let mut c0 = lab.client(0, ROLE_ADMIN).await;
    let (data, _) = snapshot(&mut c0).await;

    reset_ephemeral(&lab, &[0, 1, 2]).await;
    // At once: upload, then bootstrap from it.
    let chunks = chunks(&data);
    while_unavailable(&lab, 0, "the snapshot upload", |mut c| {
        let chunks = chunks.clone();
        async move { c.etcd_recover(futures::stream::iter(chunks)).await }
    })
    .await;
    let c0 = lab.client(0, ROLE_ADMIN).await;
    lab.wait_etcd_preparing(&c0).await;
    while_unavailable(&lab, 0, "bootstrap --recover-from", |mut c| async move {
        c.bootstrap(pb::BootstrapRequest {
            recover_etcd: true,
            recover_skip_hash_check: false,
        })
        .await
    })
    .await;
    lab.wait_members(&[0, 1, 2]).await;
    let missing = missing_keys(&lab, &[0, 1, 2], &keys).await;
    assert!(
        missing.is_empty(),
        "{} acknowledged keys lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_etcd_is_restarted_and_a_power_cycle_keeps_config_and_data() {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let mut lab = Lab::new(25);
    lab.start(Some("controlplane.yaml"));
    lab.bootstrap_and_wait(0, &[0]).await;
    let keys = write_keys(&lab, &[0], "/keep", 20).await;

    // Kill etcd behind the supervisor's back.
    let data_dir = lab.nodes[0].root.join("ephemeral/lib/etcd");
    let pid = find_pid(&format!("--data-dir={}", data_dir.display())).expect("etcd process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut c = lab.client(0, ROLE_ADMIN).await;
    let events = eventually("etcd to be restarted", Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            let s = c
                .service_list(pb::Empty {})
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            let etcd = s.messages[0]
                .services
                .iter()
                .find(|s| s.id == "etcd")
                .cloned()
                .ok_or("no etcd")?;
            let healthy = etcd.health.as_ref().is_some_and(|h| h.healthy);
            if etcd.restarts >= 1 && etcd.state() == pb::ServiceState::Running && healthy {
                Ok(etcd.events)
            } else {
                Err(format!("{etcd:?}"))
            }
        }
    })
    .await;
    let text: Vec<String> = events
        .iter()
        .map(|e| format!("[{}]: {}", e.state(), e.message))
        .collect();
    assert!(
        text.iter()
            .any(|t| t.contains("[Failed]") && t.contains("killed by a signal")),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.contains("Restarting service")),
        "{text:#?}"
    );
    assert_ne!(
        find_pid(&format!("--data-dir={}", data_dir.display())),
        Some(pid)
    );

    // Power off through the API, then start again without a config flag: STATE has it.
    c.shutdown(pb::Empty {}).await.unwrap();
    lab.wait_exit(0, EXIT_OFF, 1).await;
    assert_eq!(
        find_pid(&format!("--data-dir={}", data_dir.display())),
        None,
        "etcd stops with the node"
    );
    lab.power_on(0);
    let c = lab.client(0, ROLE_READER).await;
    eventually(
        "etcd to come back from its data",
        Duration::from_secs(60),
        || {
            let mut c = c.clone();
            async move {
                let s = c
                    .service_list(pb::Empty {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                let etcd = s.messages[0]
                    .services
                    .iter()
                    .find(|s| s.id == "etcd")
                    .cloned()
                    .ok_or("no etcd")?;
                if etcd.health.as_ref().is_some_and(|h| h.healthy) {
                    Ok(())
                } else {
                    Err(format!("{etcd:?}"))
                }
            }
        },
    )
    .await;
    assert!(missing_keys(&lab, &[0], &keys).await.is_empty());
}

fn find_pid(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (cmd.starts_with("etcd ") && cmd.contains(needle)).then_some(pid)
        })
}
