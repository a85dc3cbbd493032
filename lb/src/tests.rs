//! Unit tests on tokio's paused clock: the health checker's rise / fall thresholds and timeouts,
//! passive marking, the retry-next-upstream rule and the replay of a client's first bytes when
//! an upstream fails before answering, with a scripted [`Connector`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use crate::balancer::Balancer;
use crate::config::{Config, FrontendConfig, HealthConfig};
use crate::connector::Connector;
use crate::proxy::{ConnectError, REPLAY_LIMIT, connect_upstream, handle};
use crate::upstream::Health;
use crate::{Frontend, health};

/// How a scripted upstream answers a connect.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// Accepts after this long.
    Accept(Duration),
    /// Refuses at once, like a closed port.
    Refuse,
    /// Never answers, like a dropped SYN.
    Hang,
    /// Accepts at once and hands the server's end of the connection to the test.
    Serve,
}

/// A connector whose upstreams answer as scripted, and which logs every connect.
#[derive(Debug, Default)]
struct Scripted {
    answers: Mutex<HashMap<SocketAddr, Answer>>,
    connects: Mutex<Vec<SocketAddr>>,
    served: Mutex<Option<mpsc::UnboundedSender<(SocketAddr, DuplexStream)>>>,
}

impl Scripted {
    fn set(&self, addr: SocketAddr, answer: Answer) {
        self.answers.lock().unwrap().insert(addr, answer);
    }

    fn connects(&self) -> Vec<SocketAddr> {
        self.connects.lock().unwrap().clone()
    }

    /// The server ends of connections to upstreams answering [`Answer::Serve`], in order.
    fn serve(&self) -> mpsc::UnboundedReceiver<(SocketAddr, DuplexStream)> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.served.lock().unwrap() = Some(tx);
        rx
    }
}

impl Connector for Scripted {
    type Stream = DuplexStream;

    async fn connect(&self, addr: SocketAddr) -> io::Result<DuplexStream> {
        self.connects.lock().unwrap().push(addr);
        let answer = self.answers.lock().unwrap().get(&addr).copied();
        match answer.unwrap_or(Answer::Refuse) {
            Answer::Accept(after) => {
                tokio::time::sleep(after).await;
                Ok(tokio::io::duplex(64).0)
            }
            Answer::Refuse => Err(io::ErrorKind::ConnectionRefused.into()),
            Answer::Hang => std::future::pending().await,
            Answer::Serve => {
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                if let Some(tx) = self.served.lock().unwrap().as_ref() {
                    let _ = tx.send((addr, theirs));
                }
                Ok(ours)
            }
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn balancer(upstreams: &[SocketAddr], health: HealthConfig) -> Balancer {
    let mut config = Config::new(vec![FrontendConfig {
        name: "k8s".into(),
        listen: addr(0),
        upstreams: upstreams.to_vec(),
    }]);
    config.health = health;
    config.connect_timeout_ms = 300;
    Balancer::new(&config).unwrap()
}

fn frontend(b: &Balancer) -> Arc<Frontend> {
    b.frontend("k8s").unwrap().clone()
}

const HEALTH: HealthConfig = HealthConfig {
    interval_ms: 1000,
    timeout_ms: 500,
    rise: 2,
    fall: 3,
};

#[tokio::test(start_paused = true)]
async fn checker_applies_rise_fall_and_timeout() {
    let a = addr(10);
    let connector = Arc::new(Scripted::default());
    connector.set(a, Answer::Accept(Duration::from_millis(2)));
    let b = balancer(&[a], HEALTH);
    let f = frontend(&b);
    let up = f.upstreams()[0].clone();
    let start = Instant::now();
    let at = |ms: u64| sleep_until(start + Duration::from_millis(ms));
    tokio::spawn(health::run(
        b.shared_for_tests(),
        f.clone(),
        connector.clone(),
    ));

    // Checks run at 0, 1000, 2000, ... ms. One success is not enough for rise = 2.
    at(500).await;
    assert_eq!(up.health_state().health, Health::Unknown);
    at(1500).await;
    let s = up.health_state();
    assert_eq!(s.health, Health::Healthy);
    assert_eq!(s.last_latency, Some(Duration::from_millis(2)));

    // The upstream stops answering: each check times out after 500 ms; fall = 3.
    connector.set(a, Answer::Hang);
    at(2400).await;
    assert_eq!(
        up.health_state().failures,
        0,
        "the check at 2000 is still waiting"
    );
    at(2600).await;
    assert_eq!(up.health_state().failures, 1);
    at(3600).await;
    assert_eq!(up.health_state().health, Health::Healthy);
    at(4600).await;
    let s = up.health_state();
    assert_eq!(s.health, Health::Unhealthy);
    assert!(s.last_error.unwrap().contains("no answer within 500 ms"));
    assert_eq!(up.snapshot().check_failures, 3);

    // It comes back: unhealthy until two checks in a row succeed.
    connector.set(a, Answer::Accept(Duration::from_millis(1)));
    at(5500).await;
    assert_eq!(up.health_state().health, Health::Unhealthy);
    at(6500).await;
    assert_eq!(up.health_state().health, Health::Healthy);
    // One round per interval, no bursts after the slow rounds: checks at 0..=6000.
    assert_eq!(connector.connects().len(), 7);
}

#[tokio::test(start_paused = true)]
async fn refused_upstream_is_retried_on_the_next() {
    let (a, b_, c) = (addr(10), addr(11), addr(12));
    let connector = Scripted::default();
    connector.set(a, Answer::Refuse);
    connector.set(b_, Answer::Hang);
    connector.set(c, Answer::Accept(Duration::ZERO));
    let b = balancer(&[a, b_, c], HEALTH);
    let f = frontend(&b);
    let start = Instant::now();

    // The round-robin cursor starts at a: a refuses, b times out, c serves the client.
    let (up, _stream) = connect_upstream(&f, &connector, Duration::from_millis(300), 3, &[])
        .await
        .unwrap();
    assert_eq!(up.addr(), c);
    assert_eq!(connector.connects(), [a, b_, c]);
    assert_eq!(
        start.elapsed(),
        Duration::from_millis(300),
        "one connect timeout for b"
    );
    let snap = f.snapshot();
    assert_eq!(snap.upstreams[0].connect_failures, 1);
    assert_eq!(snap.upstreams[1].connect_failures, 1);
    assert_eq!(snap.upstreams[2].connect_failures, 0);
    assert!(
        snap.upstreams[1]
            .last_error
            .as_deref()
            .unwrap()
            .contains("no answer within 300 ms")
    );
}

#[tokio::test(start_paused = true)]
async fn passive_failures_mark_down_after_fall_and_move_it_last() {
    let (a, c) = (addr(10), addr(11));
    let connector = Scripted::default();
    // No answer (a lost SYN, say) counts toward fall; a refusal would mark it down at once.
    connector.set(a, Answer::Hang);
    connector.set(c, Answer::Accept(Duration::ZERO));
    let b = balancer(&[a, c], HEALTH);
    let f = frontend(&b);
    // fall = 2: clients keep being served by c; a goes down on its second failed connect.
    for _ in 0..4 {
        let (up, _s) = connect_upstream(&f, &connector, Duration::from_millis(300), 2, &[])
            .await
            .unwrap();
        assert_eq!(up.addr(), c);
    }
    assert_eq!(f.upstreams()[0].health_state().health, Health::Unhealthy);
    // Cursor turns 0 and 2 started at a; after it went down (turn 2) a is no longer tried.
    assert_eq!(connector.connects(), [a, c, c, a, c, c]);
    // Unhealthy upstreams are still in the plan, last, as a last resort.
    let plan: Vec<SocketAddr> = f.plan().iter().map(|u| u.addr()).collect();
    assert_eq!(plan, [c, a]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_connect_marks_the_upstream_down_at_once() {
    let (a, c) = (addr(10), addr(11));
    let connector = Scripted::default();
    connector.set(a, Answer::Refuse);
    connector.set(c, Answer::Accept(Duration::ZERO));
    let b = balancer(&[a, c], HEALTH);
    let f = frontend(&b);
    // fall = 3, yet one refusal is enough: nothing listens there.
    let (up, _s) = connect_upstream(&f, &connector, Duration::from_millis(300), 3, &[])
        .await
        .unwrap();
    assert_eq!(up.addr(), c);
    assert_eq!(f.upstreams()[0].health_state().health, Health::Unhealthy);
    for _ in 0..3 {
        connect_upstream(&f, &connector, Duration::from_millis(300), 3, &[])
            .await
            .unwrap();
    }
    assert_eq!(connector.connects(), [a, c, c, c, c]);
}

#[tokio::test(start_paused = true)]
async fn client_fails_only_when_every_upstream_fails() {
    let (a, c) = (addr(10), addr(11));
    let connector = Scripted::default();
    connector.set(a, Answer::Refuse);
    connector.set(c, Answer::Hang);
    let b = balancer(&[a, c], HEALTH);
    let f = frontend(&b);
    let err = connect_upstream(&f, &connector, Duration::from_millis(300), 3, &[])
        .await
        .unwrap_err();
    match &err {
        ConnectError::AllFailed { attempts, .. } => {
            let tried: Vec<SocketAddr> = attempts.iter().map(|(a, _)| *a).collect();
            assert_eq!(tried, [a, c]);
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("every upstream failed"));

    b.set_upstreams("k8s", &[]).unwrap();
    let err = connect_upstream(&f, &connector, Duration::from_millis(300), 3, &[])
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::NoUpstreams { .. }));
}

/// Starts one client connection through the balancer; returns the client's end.
fn client_through(b: &Balancer, connector: &Arc<Scripted>) -> (DuplexStream, watch::Sender<bool>) {
    let (client, ours) = tokio::io::duplex(256 * 1024);
    let (close_tx, close_rx) = watch::channel(false);
    tokio::spawn(handle(
        b.shared_for_tests(),
        frontend(b),
        connector.clone(),
        ours,
        addr(9999),
        close_rx,
    ));
    (client, close_tx)
}

async fn read_n(s: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.unwrap();
    buf
}

#[tokio::test(start_paused = true)]
async fn upstream_failing_before_answering_is_replaced_and_the_client_bytes_replayed() {
    let (a, c) = (addr(10), addr(11));
    let connector = Arc::new(Scripted::default());
    for u in [a, c] {
        connector.set(u, Answer::Serve);
    }
    let mut served = connector.serve();
    let b = balancer(&[a, c], HEALTH);
    let (mut client, _close) = client_through(&b, &connector);

    // The client speaks first; a receives it and dies without answering (reset or close).
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let (first, mut up_a) = served.recv().await.unwrap();
    assert_eq!(first, a);
    assert_eq!(read_n(&mut up_a, 16).await, b"GET / HTTP/1.1\r\n");
    drop(up_a);

    // The next upstream gets the same bytes again, then whatever the client sends next.
    let (second, mut up_c) = served.recv().await.unwrap();
    assert_eq!(second, c);
    assert_eq!(read_n(&mut up_c, 16).await, b"GET / HTTP/1.1\r\n");
    client.write_all(b"Host: x\r\n").await.unwrap();
    assert_eq!(read_n(&mut up_c, 9).await, b"Host: x\r\n");
    // a is down at once (fall is 3), c is not.
    let ups = frontend(&b).upstreams();
    assert_eq!(ups[0].health_state().health, Health::Unhealthy);
    assert_eq!(ups[0].snapshot().early_failures, 1);
    assert_eq!(ups[1].health_state().health, Health::Unknown);

    // c answers: the connection is committed to it. When c goes away now, the client sees the
    // end of the stream and nothing is replayed.
    up_c.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    assert_eq!(read_n(&mut client, 17).await, b"HTTP/1.1 200 OK\r\n");
    drop(up_c);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(connector.connects(), [a, c]);
    assert_eq!(ups[1].health_state().health, Health::Unknown);
    assert_eq!(frontend(&b).snapshot().connections_failed, 0);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_sent_more_than_the_replay_limit_is_not_replayed() {
    let (a, c) = (addr(10), addr(11));
    let connector = Arc::new(Scripted::default());
    connector.set(a, Answer::Serve);
    connector.set(c, Answer::Serve);
    let mut served = connector.serve();
    let b = balancer(&[a, c], HEALTH);
    let (mut client, _close) = client_through(&b, &connector);

    let big = vec![7u8; REPLAY_LIMIT + 1];
    client.write_all(&big).await.unwrap();
    let (first, mut up_a) = served.recv().await.unwrap();
    assert_eq!(first, a);
    assert_eq!(read_n(&mut up_a, big.len()).await, big);
    drop(up_a);

    // No second upstream: the client's connection ends instead.
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    assert_eq!(connector.connects(), [a]);
    let f = frontend(&b);
    assert_eq!(f.snapshot().connections_failed, 1);
    assert_eq!(f.upstreams()[0].health_state().health, Health::Unhealthy);

    // At the limit exactly, the replay still happens.
    let (mut client, _close) = client_through(&b, &connector);
    let fits = vec![8u8; REPLAY_LIMIT];
    client.write_all(&fits).await.unwrap();
    // a is down now, so c is first; make c fail and a (last resort) take the replay.
    let (first, mut up_c) = served.recv().await.unwrap();
    assert_eq!(first, c);
    assert_eq!(read_n(&mut up_c, fits.len()).await, fits);
    drop(up_c);
    let (second, mut up_a) = served.recv().await.unwrap();
    assert_eq!(second, a);
    assert_eq!(read_n(&mut up_a, fits.len()).await, fits);
    up_a.write_all(b"ok").await.unwrap();
    assert_eq!(read_n(&mut client, 2).await, b"ok");
}

#[tokio::test(start_paused = true)]
async fn an_upstream_closing_after_the_client_finished_is_an_answer() {
    // The client sends and closes its side; the upstream closes without a byte: that is the
    // upstream's (empty) answer, not a failure, so nothing is replayed.
    let (a, c) = (addr(10), addr(11));
    let connector = Arc::new(Scripted::default());
    connector.set(a, Answer::Serve);
    connector.set(c, Answer::Serve);
    let mut served = connector.serve();
    let b = balancer(&[a, c], HEALTH);
    let (mut client, _close) = client_through(&b, &connector);
    client.write_all(b"bye").await.unwrap();
    client.shutdown().await.unwrap();
    let (first, mut up_a) = served.recv().await.unwrap();
    assert_eq!(first, a);
    let mut got = Vec::new();
    up_a.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"bye");
    drop(up_a);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert_eq!(connector.connects(), [a]);
    assert_eq!(
        frontend(&b).upstreams()[0].health_state().health,
        Health::Unknown
    );
}
