//! kiln-lb side by side with HAProxy (Debian's `haproxy`, the peer the lab's balancer is
//! measured against) in front of the same three TCP echo backends, one of them dead before
//! any client connects. The same client workload goes through both: a differential check that
//! the harness itself is sound (HAProxy, configured to retry and redispatch, must pass it too)
//! and that kiln-lb spreads connections over the live backends, skips the dead one without a
//! failed client connection, and carries every byte unchanged.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_lb::{Balancer, Config, FrontendConfig, HealthConfig};
use kiln_os_api::wait::{Poll, until};
use kiln_test_tiers::{Tier, skip_unless};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Connections per balancer.
const CONNECTIONS: usize = 60;
/// Bytes each connection sends and expects back.
const PAYLOAD: usize = 64 * 1024;

/// A TCP echo server counting the connections that sent data.
async fn echo_backend() -> (SocketAddr, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let counter = counter.clone();
            conns.spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut first = true;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if first {
                                counter.fetch_add(1, Ordering::Relaxed);
                                first = false;
                            }
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, served, task)
}

/// A port nothing listens on (bound, then released): a dead backend.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Sends a distinct payload on one connection and checks that the echo is byte-identical.
async fn round_trip(addr: SocketAddr, seed: u8) -> Result<(), String> {
    let payload: Vec<u8> = (0..PAYLOAD)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let send = payload.clone();
    let writer = tokio::spawn(async move { w.write_all(&send).await.map(|_| w) });
    let mut got = vec![0u8; PAYLOAD];
    r.read_exact(&mut got)
        .await
        .map_err(|e| format!("read: {e}"))?;
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("write: {e}"))?;
    if got != payload {
        return Err("echo differs from what was sent".into());
    }
    Ok(())
}

/// Runs the workload against `addr`: the number of failed connections and their first error.
async fn workload(addr: SocketAddr) -> (usize, Option<String>) {
    let mut failed = 0;
    let mut first = None;
    for i in 0..CONNECTIONS {
        if let Err(e) = round_trip(addr, i as u8).await {
            failed += 1;
            first.get_or_insert(e);
        }
    }
    (failed, first)
}

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr]) -> String {
    let mut c = format!(
        "global\n  maxconn 1000\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 10s\n  timeout server 10s\n  \
         retries 3\n  option redispatch 1\n\
         frontend fe\n  bind {listen}\n  default_backend be\n\
         backend be\n  balance roundrobin\n  default-server check inter 100 rise 2 fall 2 \
         observe layer4 error-limit 2 on-error mark-down\n"
    );
    for b in backends {
        c.push_str(&format!("  server s{} {b}\n", b.port()));
    }
    c
}

async fn listening(addr: SocketAddr) {
    until(
        "the balancer to listen",
        Poll::every(Duration::from_millis(50), Duration::from_secs(10)),
        || async move { TcpStream::connect(addr).await.map(drop) },
    )
    .await
    .unwrap();
}

fn start_haproxy(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Haproxy {
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(listen, backends)).unwrap();
    Haproxy(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_lb_and_haproxy_carry_the_same_workload_past_a_dead_backend() {
    skip_unless!(Tier::Haproxy);
    let dir = tempfile::tempdir().unwrap();
    let (a, served_a, _ta) = echo_backend().await;
    let (b, served_b, _tb) = echo_backend().await;
    let dead = dead_port().await;
    let backends = [a, dead, b];

    // HAProxy first: if the harness were wrong, the reference would fail too.
    let ha_addr = dead_port().await;
    let _haproxy = start_haproxy(dir.path(), ha_addr, &backends);
    listening(ha_addr).await;
    let (ha_failed, ha_err) = workload(ha_addr).await;
    let ha_split = (
        served_a.swap(0, Ordering::Relaxed),
        served_b.swap(0, Ordering::Relaxed),
    );
    assert_eq!(
        ha_failed,
        0,
        "the reference (HAProxy with retries and redispatch) failed {ha_failed} connections: {ha_err:?}; {}",
        std::fs::read_to_string(dir.path().join("haproxy.err")).unwrap_or_default()
    );

    let mut config = Config::new(vec![FrontendConfig {
        name: "k8s".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstreams: backends.to_vec(),
    }]);
    config.health = HealthConfig {
        interval_ms: 100,
        timeout_ms: 100,
        rise: 2,
        fall: 2,
    };
    let balancer = Balancer::new(&config).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let kiln_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn({
        let b = balancer.clone();
        async move {
            b.serve(vec![("k8s".into(), listener)], async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let (kiln_failed, kiln_err) = workload(kiln_addr).await;
    let kiln_split = (
        served_a.load(Ordering::Relaxed),
        served_b.load(Ordering::Relaxed),
    );
    let _ = stop.send(());
    serve.await.unwrap().unwrap();

    println!(
        "{CONNECTIONS} connections × {PAYLOAD} bytes, 1 of 3 backends dead: \
         haproxy {ha_failed} failed, split {ha_split:?}; kiln-lb {kiln_failed} failed, split {kiln_split:?}"
    );
    assert_eq!(
        kiln_failed, 0,
        "kiln-lb failed {kiln_failed} connections: {kiln_err:?}"
    );
    assert_eq!(
        kiln_split.0 + kiln_split.1,
        CONNECTIONS as u64,
        "every connection reached a live backend once"
    );
    for (name, (x, y)) in [("haproxy", ha_split), ("kiln-lb", kiln_split)] {
        assert!(
            x > 0 && y > 0,
            "{name} should spread connections over both live backends: {x} and {y}"
        );
    }
}
