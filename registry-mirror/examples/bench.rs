//! Benchmark (not a test): blob pull throughput of this registry and of Debian's
//! `docker-registry` side by side, one large blob and many small blobs with 16 concurrent
//! clients, then the cold and warm pull time of an image through the mirror (upstream:
//! `docker-registry`, or this registry when `docker-registry` is not installed).
//!
//! Run: `cargo run --release -p kiln-registry-mirror --example bench`
//! Sizes: KILN_BENCH_LARGE_MB (default 256), KILN_BENCH_SMALL_COUNT (default 1000),
//! KILN_BENCH_SMALL_KB (default 16), KILN_BENCH_LAYER_MB (default 32, four layers).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use kiln_registry_mirror::manifest::{ACCEPT_ALL, OCI_MANIFEST};
use kiln_registry_mirror::reference::Digest;
use kiln_registry_mirror::{ApiConfig, Mirror, Registry, Storage, UpstreamConfig};

const CLIENTS: usize = 16;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn data(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    Bytes::from(v)
}

struct Server {
    url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_ours(mirror: Option<Mirror>) -> anyhow::Result<Server> {
    let dir = tempfile::tempdir()?;
    let registry = Arc::new(Registry {
        storage: Arc::new(Storage::open(dir.path())?),
        mirror: mirror.map(Arc::new),
        config: ApiConfig::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(kiln_registry_mirror::server::serve(
        listener,
        None,
        kiln_registry_mirror::router(registry),
        1024,
        async {
            let _ = rx.await;
        },
    ));
    Ok(Server {
        url,
        _stop: tx,
        _dir: dir,
    })
}

struct DockerRegistry {
    url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_docker_registry() -> anyhow::Result<Option<DockerRegistry>> {
    let found = Command::new("sh")
        .args(["-c", "command -v docker-registry"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        ),
    )?;
    // Debian's default configuration plus no access log (this registry logs none either).
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting docker-registry")?;
    let url = format!("http://127.0.0.1:{port}");
    let reg = DockerRegistry {
        url,
        child,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if reqwest::get(format!("{}/v2/", reg.url))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(Some(reg));
        }
        if Instant::now() > deadline {
            bail!("docker-registry did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POST + PUT ?digest= (the upload both registries accept).
async fn push(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    body: Bytes,
) -> anyhow::Result<Digest> {
    let d = Digest::of(&body);
    let r = http
        .post(format!("{url}/v2/{name}/blobs/uploads/"))
        .send()
        .await?;
    let loc = r
        .headers()
        .get("location")
        .context("no Location")?
        .to_str()?
        .to_owned();
    let loc = if loc.starts_with("http") {
        loc
    } else {
        format!("{url}{loc}")
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = http
        .put(format!("{loc}{sep}digest={d}"))
        .body(body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("push to {url}: {}", r.status());
    }
    Ok(d)
}

async fn pull(http: &reqwest::Client, url: &str, name: &str, d: &Digest) -> anyhow::Result<u64> {
    let mut r = http
        .get(format!("{url}/v2/{name}/blobs/{d}"))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("GET {d} from {url}: {}", r.status());
    }
    let mut n = 0u64;
    while let Some(c) = r.chunk().await? {
        n += c.len() as u64;
    }
    Ok(n)
}

struct Throughput {
    large_mbps: f64,
    small_rps: f64,
    small_mbps: f64,
}

async fn measure(
    http: &reqwest::Client,
    url: &str,
    large: &Bytes,
    small: &[Bytes],
) -> anyhow::Result<Throughput> {
    let ld = push(http, url, "bench/large", large.clone()).await?;
    let mut small_digests = Vec::new();
    for s in small {
        small_digests.push(push(http, url, "bench/small", s.clone()).await?);
    }
    // Large blob: one client, best of three.
    pull(http, url, "bench/large", &ld).await?;
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let n = pull(http, url, "bench/large", &ld).await?;
        anyhow::ensure!(n == large.len() as u64);
        best = best.min(t.elapsed());
    }
    let large_mbps = large.len() as f64 / (1 << 20) as f64 / best.as_secs_f64();
    // Small blobs: 16 clients, each pulling every blob once (interleaved starting points).
    let digests = Arc::new(small_digests);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, url, digests) = (http.clone(), url.to_owned(), digests.clone());
        tasks.push(tokio::spawn(async move {
            let mut bytes = 0u64;
            for i in 0..digests.len() {
                let d = &digests[(i + c * digests.len() / CLIENTS) % digests.len()];
                bytes += pull(&http, &url, "bench/small", d).await?;
            }
            anyhow::Ok(bytes)
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await??;
    }
    let el = t.elapsed().as_secs_f64();
    Ok(Throughput {
        large_mbps,
        small_rps: (CLIENTS * digests.len()) as f64 / el,
        small_mbps: total as f64 / (1 << 20) as f64 / el,
    })
}

/// Pushes an image of `layers` to `url` as `bench/image:v1`; returns its blob digests.
async fn push_image(http: &reqwest::Client, url: &str, layers: &[Bytes]) -> anyhow::Result<()> {
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let cd = push(http, url, "bench/image", config.clone()).await?;
    let mut descs = Vec::new();
    for l in layers {
        let d = push(http, url, "bench/image", l.clone()).await?;
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": l.len()}));
    }
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": config.len()},
        "layers": descs});
    let r = http
        .put(format!("{url}/v2/bench/image/manifests/v1"))
        .header("content-type", OCI_MANIFEST)
        .body(m.to_string())
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "manifest push: {}", r.status());
    Ok(())
}

/// Pulls `bench/image:v1` as a container runtime does: manifest, then all blobs at once.
async fn pull_image(http: &reqwest::Client, url: &str) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let r = http
        .get(format!("{url}/v2/bench/image/manifests/v1"))
        .header("accept", ACCEPT_ALL)
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "manifest pull: {}", r.status());
    let m: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
    let mut digests = vec![
        m["config"]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ];
    for l in m["layers"].as_array().into_iter().flatten() {
        digests.push(l["digest"].as_str().unwrap_or_default().to_owned());
    }
    let mut tasks = Vec::new();
    for d in digests {
        let (http, url) = (http.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let d: Digest = d.parse()?;
            pull(&http, &url, "bench/image", &d).await
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok((t.elapsed(), total))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let large_mb = env_or("KILN_BENCH_LARGE_MB", 256);
    let small_count = env_or("KILN_BENCH_SMALL_COUNT", 1000);
    let small_kb = env_or("KILN_BENCH_SMALL_KB", 16);
    let layer_mb = env_or("KILN_BENCH_LAYER_MB", 32);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let large = data(1, large_mb << 20);
    let small: Vec<Bytes> = (0..small_count)
        .map(|i| data(100 + i as u64, small_kb << 10))
        .collect();
    println!(
        "registry blob pull throughput on loopback ({} cores; client in the same process)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  large: one {large_mb} MiB blob, one client, best of 3");
    println!(
        "  small: {small_count} blobs of {small_kb} KiB, {CLIENTS} concurrent clients, each pulls every blob"
    );
    println!(
        "{:<22} {:>14} {:>14} {:>14}",
        "registry", "large MiB/s", "small req/s", "small MiB/s"
    );
    let ours = start_ours(None).await?;
    let t = measure(&http, &ours.url, &large, &small).await?;
    println!(
        "{:<22} {:>14.1} {:>14.0} {:>14.1}",
        "kiln-registry-mirror", t.large_mbps, t.small_rps, t.small_mbps
    );
    let docker = start_docker_registry().await?;
    match &docker {
        Some(d) => {
            let t = measure(&http, &d.url, &large, &small).await?;
            println!(
                "{:<22} {:>14.1} {:>14.0} {:>14.1}",
                "docker-registry", t.large_mbps, t.small_rps, t.small_mbps
            );
        }
        None => println!(
            "{:<22} skipped: docker-registry is not installed",
            "docker-registry"
        ),
    }

    // Mirror: cold and warm pulls of a 4-layer image.
    let (upstream_url, upstream_name, _own_upstream) = match &docker {
        Some(d) => (d.url.clone(), "docker-registry", None),
        None => {
            let s = start_ours(None).await?;
            (s.url.clone(), "kiln-registry-mirror", Some(s))
        }
    };
    let layers: Vec<Bytes> = (0..4).map(|i| data(1000 + i, layer_mb << 20)).collect();
    push_image(&http, &upstream_url, &layers).await?;
    let mirror = Mirror::new(
        vec![UpstreamConfig::parse(&format!("docker.io={upstream_url}"))?],
        None,
        Duration::from_secs(3600),
    )?;
    let mirror = start_ours(Some(mirror)).await?;
    println!();
    println!(
        "image pull through the mirror (upstream: {upstream_name}; 4 layers of {layer_mb} MiB + config, blobs pulled concurrently)"
    );
    let (direct, n) = pull_image(&http, &upstream_url).await?;
    println!(
        "  direct from upstream:   {:>8.3} s  ({:.1} MiB)",
        direct.as_secs_f64(),
        n as f64 / (1 << 20) as f64
    );
    let (cold, _) = pull_image(&http, &mirror.url).await?;
    println!("  cold (through mirror):  {:>8.3} s", cold.as_secs_f64());
    let (warm, _) = pull_image(&http, &mirror.url).await?;
    println!("  warm (from mirror cache): {:>6.3} s", warm.as_secs_f64());
    Ok(())
}
