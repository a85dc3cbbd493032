//! The balancer end to end on 127.0.0.1 with real TCP echo backends: round robin, failover,
//! live upstream changes, drain, counters, the control socket and reloads.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_lb::{Balancer, Config, FrontendConfig, Health, HealthConfig, Snapshot, control};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// A TCP echo server; `served` counts connections that sent data (health checks send none).
struct Backend {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Backend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            // Dropping the set (when this task is aborted) kills every connection too.
            let mut conns = JoinSet::new();
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
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
        Self { addr, served, task }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection, like a killed process.
    async fn kill(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

struct Lb {
    addr: SocketAddr,
    balancer: Balancer,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Lb {
    async fn start(upstreams: &[SocketAddr], tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::new(vec![FrontendConfig {
            name: "k8s".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            upstreams: upstreams.to_vec(),
        }]);
        config.health = HealthConfig {
            interval_ms: 100,
            timeout_ms: 100,
            rise: 2,
            fall: 2,
        };
        tune(&mut config);
        let balancer = Balancer::new(&config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let b = balancer.clone();
        let task = tokio::spawn(async move {
            b.serve(vec![("k8s".into(), listener)], async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            balancer,
            stop: Some(stop),
            task,
        }
    }

    fn snapshot(&self) -> Snapshot {
        self.balancer.snapshot()
    }

    fn upstream(&self, addr: SocketAddr) -> kiln_lb::UpstreamSnapshot {
        self.snapshot().frontends[0]
            .upstreams
            .iter()
            .find(|u| u.address == addr)
            .unwrap()
            .clone()
    }

    fn shutdown(&mut self) {
        let _ = self.stop.take().unwrap().send(());
    }
}

/// Polls `cond` every 10 ms until it holds or `what` times out after 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut`, failing the test if it takes more than 10 s.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Sends `msg` and checks that it comes back.
async fn echo(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    stream.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back).await?;
    assert_eq!(back, msg, "the echo came back changed");
    Ok(())
}

/// One short client connection: connect, echo, close.
async fn one_request(lb: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(lb).await?;
    echo(&mut s, b"ping").await
}

#[tokio::test]
async fn round_robin_spreads_connections() {
    let backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = Lb::start(&addrs, |_| {}).await;
    for _ in 0..30 {
        within("request", one_request(lb.addr)).await.unwrap();
    }
    let served: Vec<u64> = backends.iter().map(Backend::served).collect();
    assert_eq!(served.iter().sum::<u64>(), 30);
    // Loopback latencies are all within the preferred group, so the spread is even unless a
    // check was delayed by more than 5 ms on a loaded machine; allow for that, not for bias.
    assert!(served.iter().all(|&n| n >= 5), "uneven spread: {served:?}");
    let snap = lb.snapshot();
    let f = &snap.frontends[0];
    assert_eq!(f.connections_total, 30);
    assert_eq!(f.connections_failed, 0);
    let per_upstream: Vec<u64> = f.upstreams.iter().map(|u| u.connections_total).collect();
    assert_eq!(per_upstream, served);
}

#[tokio::test]
async fn dead_backend_is_skipped_without_client_failures() {
    let mut backends = [
        Backend::start().await,
        Backend::start().await,
        Backend::start().await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let lb = Lb::start(&addrs, |_| {}).await;
    eventually("all upstreams healthy", || {
        lb.snapshot().frontends[0]
            .upstreams
            .iter()
            .all(|u| u.health == Health::Healthy)
    })
    .await;

    backends[1].kill().await;
    // Before and after it is marked down, every client is served (refused → next upstream).
    for _ in 0..30 {
        within("request", one_request(lb.addr)).await.unwrap();
    }
    eventually("dead upstream marked unhealthy", || {
        lb.upstream(addrs[1]).health == Health::Unhealthy
    })
    .await;
    let failures_when_down = lb.upstream(addrs[1]).connect_failures;
    assert!(failures_when_down <= 2, "fall = 2 passive failures at most");
    let before = (backends[0].served(), backends[2].served());
    for _ in 0..30 {
        within("request", one_request(lb.addr)).await.unwrap();
    }
    // Once unhealthy it gets no client connects while others are healthy.
    assert_eq!(lb.upstream(addrs[1]).connect_failures, failures_when_down);
    assert_eq!(
        backends[0].served() + backends[2].served(),
        before.0 + before.1 + 30
    );
    assert_eq!(lb.snapshot().frontends[0].connections_failed, 0);

    // It comes back on its old address: healthy again after `rise` checks.
    let listener = TcpListener::bind(addrs[1]).await.unwrap();
    let _keep = tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    });
    eventually("restarted upstream healthy", || {
        lb.upstream(addrs[1]).health == Health::Healthy
    })
    .await;
}

#[tokio::test]
async fn every_upstream_down_fails_the_client_and_counts_it() {
    let mut gone = Backend::start().await;
    gone.kill().await;
    let lb = Lb::start(&[gone.addr], |_| {}).await;
    let mut s = within("connect", TcpStream::connect(lb.addr))
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    // The balancer closes the client: EOF or reset, never data.
    let n = within("close", s.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0);
    eventually("failed connection counted", || {
        lb.snapshot().frontends[0].connections_failed == 1
    })
    .await;
}

#[tokio::test]
async fn changing_upstreams_keeps_established_connections() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let lb = Lb::start(&[a.addr], |_| {}).await;
    let mut old = within("connect", TcpStream::connect(lb.addr))
        .await
        .unwrap();
    within("echo", echo(&mut old, b"before")).await.unwrap();

    let change = lb.balancer.set_upstreams("k8s", &[b.addr]).unwrap();
    assert_eq!(change.added, [b.addr]);
    assert_eq!(change.removed, [a.addr]);

    // The established connection still reaches a; new ones go to b.
    within("echo", echo(&mut old, b"after")).await.unwrap();
    within("request", one_request(lb.addr)).await.unwrap();
    assert_eq!((a.served(), b.served()), (1, 1));
    let snap = lb.snapshot();
    let ups: Vec<SocketAddr> = snap.frontends[0]
        .upstreams
        .iter()
        .map(|u| u.address)
        .collect();
    assert_eq!(ups, [b.addr]);
    // The short request's connection closes; the old one stays open.
    eventually("one connection left", || {
        lb.snapshot().frontends[0].connections_active == 1
    })
    .await;
    within("echo", echo(&mut old, b"still")).await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_open_connections() {
    let a = Backend::start().await;
    let mut lb = Lb::start(&[a.addr], |c| c.drain_timeout_ms = 60_000).await;
    let mut open = within("connect", TcpStream::connect(lb.addr))
        .await
        .unwrap();
    within("echo", echo(&mut open, b"one")).await.unwrap();

    lb.shutdown();
    // New clients are refused once the listener is closed...
    let addr = lb.addr;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener still open after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...while the open one goes on, and the balancer waits for it.
    within("echo", echo(&mut open, b"two")).await.unwrap();
    assert!(!lb.task.is_finished());
    drop(open);
    within("drain", &mut lb.task).await.unwrap();
}

#[tokio::test]
async fn drain_deadline_closes_lingering_connections() {
    let a = Backend::start().await;
    let mut lb = Lb::start(&[a.addr], |c| c.drain_timeout_ms = 200).await;
    let mut open = within("connect", TcpStream::connect(lb.addr))
        .await
        .unwrap();
    within("echo", echo(&mut open, b"one")).await.unwrap();
    lb.shutdown();
    within("drain deadline", &mut lb.task).await.unwrap();
    let mut buf = [0u8; 1];
    let n = within("close", open.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "the balancer closed the lingering connection");
}

#[tokio::test]
async fn counters_follow_traffic_while_connections_are_open() {
    let a = Backend::start().await;
    let lb = Lb::start(&[a.addr], |_| {}).await;
    let mut s = within("connect", TcpStream::connect(lb.addr))
        .await
        .unwrap();
    let msg = vec![7u8; 100_000];
    within("echo", echo(&mut s, &msg)).await.unwrap();
    eventually("bytes counted while open", || {
        let u = lb.upstream(a.addr);
        u.bytes_to_upstream == 100_000 && u.bytes_from_upstream == 100_000
    })
    .await;
    let u = lb.upstream(a.addr);
    assert_eq!((u.connections_total, u.connections_active), (1, 1));
    drop(s);
    eventually("connection closed", || {
        lb.upstream(a.addr).connections_active == 0
    })
    .await;
    let json = serde_json::to_value(lb.snapshot()).unwrap();
    assert_eq!(
        json["frontends"][0]["upstreams"][0]["bytesToUpstream"],
        100_000
    );
    assert_eq!(json["frontends"][0]["connectionsTotal"], 1);
}

#[tokio::test]
async fn control_socket_reports_and_changes_upstreams() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let lb = Lb::start(&[a.addr], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(control::serve(
        listener,
        lb.balancer.clone(),
        std::future::pending(),
    ));

    within("request", one_request(lb.addr)).await.unwrap();
    let snap = within("status", control::status(&path)).await.unwrap();
    assert_eq!(snap.frontends[0].name, "k8s");
    assert_eq!(snap.frontends[0].upstreams[0].address, a.addr);
    assert_eq!(snap.frontends[0].connections_total, 1);

    let snap = within(
        "set",
        control::set_upstreams(&path, "k8s", &[a.addr, b.addr]),
    )
    .await
    .unwrap();
    assert_eq!(snap.frontends[0].upstreams.len(), 2);
    assert_eq!(lb.snapshot().frontends[0].upstreams.len(), 2);

    let err = within("bad set", control::set_upstreams(&path, "nope", &[a.addr]))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no frontend is called \"nope\""),
        "{err}"
    );

    // Raw protocol: one response line per request line, errors as {"ok":false}.
    let mut raw = tokio::net::UnixStream::connect(&path).await.unwrap();
    raw.write_all(b"not json\n{\"op\":\"status\"}\n")
        .await
        .unwrap();
    raw.shutdown().await.unwrap();
    let mut text = String::new();
    within("raw", raw.read_to_string(&mut text)).await.unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["ok"], false);
    assert!(lines[0]["error"].as_str().unwrap().contains("bad request"));
    assert_eq!(lines[1]["ok"], true);

    drop(dir);
    let err = within("gone", control::status(&path)).await.unwrap_err();
    assert!(
        err.to_string().contains("is `kiln lb run` running?"),
        "{err}"
    );
}

#[tokio::test]
async fn reload_applies_a_rewritten_file() {
    let (a, b) = (Backend::start().await, Backend::start().await);
    let lb = Lb::start(&[a.addr], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.yaml");
    let write = |upstreams: &[SocketAddr], listen: &str| {
        let text = format!(
            "frontends:\n  - name: k8s\n    listen: \"{listen}\"\n    upstreams: [{}]\nhealth:\n  intervalMs: 50\n",
            upstreams
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::fs::write(&file, text).unwrap();
    };

    write(&[b.addr], "127.0.0.1:0");
    lb.balancer.reload(&Config::load(&file).unwrap()).unwrap();
    within("request", one_request(lb.addr)).await.unwrap();
    assert_eq!((a.served(), b.served()), (0, 1));

    // Moving the listener needs a restart: refused, nothing applied.
    write(&[a.addr], "127.0.0.1:1");
    let err = lb
        .balancer
        .reload(&Config::load(&file).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("restart"), "{err}");
    assert_eq!(lb.snapshot().frontends[0].upstreams[0].address, b.addr);
}
