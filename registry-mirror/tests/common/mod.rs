//! Shared helpers for the integration tests: start a registry on 127.0.0.1:0 in a task,
//! record the requests it receives, and poll a condition with a deadline.
#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose
#![allow(dead_code)] // each test crate uses part of the helpers

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use kiln_registry_mirror::{ApiConfig, Mirror, Registry, Storage};
use tokio::sync::oneshot;

/// A registry running in this process.
pub struct TestRegistry {
    pub addr: SocketAddr,
    pub url: String,
    pub registry: Arc<Registry>,
    /// `METHOD path?query` of every request when it arrives, and `done METHOD path?query
    /// STATUS` when its handler has answered.
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl TestRegistry {
    pub async fn start(config: ApiConfig, mirror: Option<Mirror>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Self::start_at(dir.path(), config, mirror, None).await;
        r._dir = Some(dir);
        r
    }

    pub async fn start_at(
        root: &Path,
        config: ApiConfig,
        mirror: Option<Mirror>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let registry = Arc::new(Registry {
            storage: Arc::new(Storage::open(root).unwrap()),
            mirror: mirror.map(Arc::new),
            config,
        });
        let requests = Arc::new(Mutex::new(Vec::new()));
        let rec = requests.clone();
        let app: Router =
            kiln_registry_mirror::router(registry.clone()).layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    let rec = rec.clone();
                    async move {
                        let line = format!(
                            "{} {}",
                            req.method(),
                            req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
                        );
                        rec.lock().unwrap().push(line.clone());
                        let resp = next.run(req).await;
                        rec.lock()
                            .unwrap()
                            .push(format!("done {line} {}", resp.status().as_u16()));
                        resp
                    }
                },
            ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(kiln_registry_mirror::server::serve(
            listener,
            tls,
            app,
            256,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            addr,
            url: format!("{scheme}://{addr}"),
            registry,
            requests,
            stop: Some(tx),
            task: Some(task),
            _dir: None,
        }
    }

    /// How many requests matched `pred`.
    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// Stops the server and waits until it no longer accepts connections.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deterministic pseudo-random bytes (different for each seed), incompressible enough that
/// layers are not tiny.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
