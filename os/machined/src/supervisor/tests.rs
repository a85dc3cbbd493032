//! Supervisor tests with small shell services (real processes, no sleeps: every wait polls a
//! condition with a deadline through `wait_for`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;

use super::*;

struct Sh {
    id: &'static str,
    script: String,
    deps: Vec<&'static str>,
    policy: RestartPolicy,
    healthy: Option<Arc<AtomicBool>>,
    grace: Duration,
    health_interval: Duration,
}

fn sh(id: &'static str, script: &str) -> Sh {
    Sh {
        id,
        script: script.to_owned(),
        deps: vec![],
        policy: RestartPolicy::Always,
        healthy: None,
        grace: Duration::from_secs(5),
        health_interval: Duration::from_millis(50),
    }
}

#[async_trait]
impl Service for Sh {
    fn id(&self) -> &'static str {
        self.id
    }
    fn dependencies(&self) -> Vec<&'static str> {
        self.deps.clone()
    }
    fn restart_policy(&self) -> RestartPolicy {
        self.policy
    }
    async fn pre_start(&self, _ctx: &ServiceContext) -> Result<Prepared, ServiceError> {
        Ok(Prepared::Run)
    }
    fn command(&self) -> Result<CommandSpec, ServiceError> {
        Ok(CommandSpec {
            program: "sh".into(),
            args: vec!["-c".into(), self.script.clone()],
            env: vec![],
        })
    }
    async fn health_check(&self) -> Option<Result<(), String>> {
        self.healthy.as_ref().map(|h| {
            if h.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("not yet".into())
            }
        })
    }
    fn health_interval(&self) -> Duration {
        self.health_interval
    }
    fn stop_grace(&self) -> Duration {
        self.grace
    }
}

const T: Duration = Duration::from_secs(20);

fn supervisor() -> Arc<Supervisor> {
    Supervisor::new(Arc::new(EventBus::new(100)), 4096)
}

fn messages(s: &ServiceStatus) -> Vec<String> {
    s.events
        .iter()
        .map(|e| format!("[{}]: {}", e.state.as_str(), e.message))
        .collect()
}

#[tokio::test]
async fn dependent_waits_until_dependency_is_healthy() {
    let sup = supervisor();
    let healthy = Arc::new(AtomicBool::new(false));
    sup.add(Arc::new(Sh {
        healthy: Some(healthy.clone()),
        ..sh("db", "exec sleep 60")
    }));
    sup.add(Arc::new(Sh {
        deps: vec!["db"],
        ..sh("app", "exec sleep 60")
    }));
    let app = sup
        .wait_for("app", "waiting", T, |s| {
            s.state == ServiceState::Waiting
                && s.events.iter().any(|e| e.message.contains("\"db\""))
        })
        .await
        .unwrap();
    assert!(
        messages(&app)
            .iter()
            .any(|m| m == "[Waiting]: Waiting for service \"db\" to be \"up\""),
        "{:?}",
        messages(&app)
    );
    assert_eq!(sup.status("db").unwrap().state, ServiceState::Running);
    healthy.store(true, Ordering::SeqCst);
    sup.wait_for("app", "running", T, |s| s.state == ServiceState::Running)
        .await
        .unwrap();
    let db = sup.status("db").unwrap();
    assert!(
        messages(&db)
            .iter()
            .any(|m| m.contains("Health check successful")),
        "{:?}",
        messages(&db)
    );
    sup.stop_all().await;
    for s in sup.list() {
        assert_eq!(s.state, ServiceState::Finished, "{}", s.id);
    }
}

#[tokio::test]
async fn a_starting_service_is_seen_healthy_soon_though_its_interval_is_long() {
    let sup = supervisor();
    let healthy = Arc::new(AtomicBool::new(false));
    sup.add(Arc::new(Sh {
        healthy: Some(healthy.clone()),
        health_interval: Duration::from_secs(600),
        ..sh("db", "exec sleep 60")
    }));
    sup.wait_for("db", "a failed first check", T, |s| {
        s.events
            .iter()
            .any(|e| e.message.contains("Health check failed"))
    })
    .await
    .unwrap();
    healthy.store(true, Ordering::SeqCst);
    // Not 600 s: until the first good check it is looked at every 200 ms.
    sup.wait_for("db", "healthy", Duration::from_secs(5), |s| {
        s.events
            .iter()
            .any(|e| e.message.contains("Health check successful"))
    })
    .await
    .unwrap();
    sup.stop_all().await;
}

#[tokio::test]
async fn always_restarts_a_failing_process_and_says_so() {
    let sup = supervisor();
    sup.add(Arc::new(sh("flaky", "echo starting; exit 3")));
    let s = sup
        .wait_for("flaky", "restarted twice", T, |s| s.restarts >= 2)
        .await
        .unwrap();
    let m = messages(&s);
    assert!(
        m.iter()
            .any(|m| m == "[Failed]: Service exited with code 3"),
        "{m:?}"
    );
    assert!(
        m.iter().any(|m| m == "[Waiting]: Restarting service"),
        "{m:?}"
    );
    let log = sup.with_log("flaky", |l| l.tail(None).0).unwrap();
    assert!(
        log.len() >= 2 && log.iter().all(|l| l.as_ref() == b"starting\n"),
        "{log:?}"
    );
    sup.stop("flaky").await.unwrap();
}

#[tokio::test]
async fn until_success_and_never_policies() {
    let sup = supervisor();
    sup.add(Arc::new(Sh {
        policy: RestartPolicy::UntilSuccess,
        ..sh("once", "exit 0")
    }));
    sup.add(Arc::new(Sh {
        policy: RestartPolicy::Never,
        ..sh("fails", "exit 1")
    }));
    let once = sup
        .wait_for("once", "finished", T, |s| s.state == ServiceState::Finished)
        .await
        .unwrap();
    assert!(
        messages(&once)
            .iter()
            .any(|m| m == "[Finished]: Service finished successfully")
    );
    let fails = sup
        .wait_for("fails", "failed", T, |s| s.state == ServiceState::Failed)
        .await
        .unwrap();
    assert_eq!(fails.restarts, 0);
    assert_eq!(once.restarts, 0);
    // A stopped service starts again on request.
    sup.start("once").unwrap();
    sup.wait_for("once", "finished twice", T, |s| {
        s.events
            .iter()
            .filter(|e| e.message == "Service finished successfully")
            .count()
            >= 2
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_grace_period() {
    let sup = supervisor();
    // Ignores SIGTERM.
    sup.add(Arc::new(Sh {
        grace: Duration::from_millis(300),
        ..sh(
            "stubborn",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
        )
    }));
    sup.wait_for("stubborn", "running", T, |s| {
        s.state == ServiceState::Running
    })
    .await
    .unwrap();
    // Wait until the shell has installed its trap (it prints "ready" after).
    let deadline = std::time::Instant::now() + T;
    while !sup
        .with_log("stubborn", |l| {
            l.tail(None).0.iter().any(|l| l.as_ref() == b"ready\n")
        })
        .unwrap()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the service never printed ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    sup.stop("stubborn").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL came before the grace period"
    );
    assert_eq!(
        sup.status("stubborn").unwrap().state,
        ServiceState::Finished
    );
}

#[tokio::test]
async fn unknown_service_lists_known_ones() {
    let sup = supervisor();
    sup.add(Arc::new(sh("a", "exec sleep 60")));
    let err = sup.start("b").unwrap_err().to_string();
    assert!(
        err.contains("\"b\" does not exist") && err.contains("a"),
        "{err}"
    );
    sup.stop_all().await;
}

#[tokio::test]
async fn missing_binary_fails_with_the_reason() {
    let sup = supervisor();
    struct Missing;
    #[async_trait]
    impl Service for Missing {
        fn id(&self) -> &'static str {
            "missing"
        }
        fn restart_policy(&self) -> RestartPolicy {
            RestartPolicy::Never
        }
        async fn pre_start(&self, _ctx: &ServiceContext) -> Result<Prepared, ServiceError> {
            Ok(Prepared::Run)
        }
        fn command(&self) -> Result<CommandSpec, ServiceError> {
            Ok(CommandSpec {
                program: "/nonexistent/binary".into(),
                ..CommandSpec::default()
            })
        }
    }
    sup.add(Arc::new(Missing));
    let s = sup
        .wait_for("missing", "failed", T, |s| s.state == ServiceState::Failed)
        .await
        .unwrap();
    assert!(
        messages(&s)
            .iter()
            .any(|m| m.contains("Failed to start the process")),
        "{:?}",
        messages(&s)
    );
}
