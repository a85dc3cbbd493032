//! Unit tests on tokio's paused clock: the health checker's rise / fall thresholds and timeouts,
//! passive marking, and the retry-next-upstream rule, with a scripted [`Connector`].

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::DuplexStream;
use tokio::time::{Instant, sleep_until};

use crate::balancer::Balancer;
use crate::config::{Config, FrontendConfig, HealthConfig};
use crate::connector::Connector;
use crate::proxy::{ConnectError, connect_upstream};
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
}

/// A connector whose upstreams answer as scripted, and which logs every connect.
#[derive(Debug, Default)]
struct Scripted {
    answers: Mutex<HashMap<SocketAddr, Answer>>,
    connects: Mutex<Vec<SocketAddr>>,
}

impl Scripted {
    fn set(&self, addr: SocketAddr, answer: Answer) {
        self.answers.lock().unwrap().insert(addr, answer);
    }

    fn connects(&self) -> Vec<SocketAddr> {
        self.connects.lock().unwrap().clone()
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
    let (up, _stream) = connect_upstream(&f, &connector, Duration::from_millis(300), 3)
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
    connector.set(a, Answer::Refuse);
    connector.set(c, Answer::Accept(Duration::ZERO));
    let b = balancer(&[a, c], HEALTH);
    let f = frontend(&b);
    // fall = 2: clients keep being served by c; a goes down on its second failed connect.
    for _ in 0..4 {
        let (up, _s) = connect_upstream(&f, &connector, Duration::from_millis(300), 2)
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
async fn client_fails_only_when_every_upstream_fails() {
    let (a, c) = (addr(10), addr(11));
    let connector = Scripted::default();
    connector.set(a, Answer::Refuse);
    connector.set(c, Answer::Hang);
    let b = balancer(&[a, c], HEALTH);
    let f = frontend(&b);
    let err = connect_upstream(&f, &connector, Duration::from_millis(300), 3)
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
    let err = connect_upstream(&f, &connector, Duration::from_millis(300), 3)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::NoUpstreams { .. }));
}
