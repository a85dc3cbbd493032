//! Benchmark (not a test): blob pull throughput of this registry and of Debian's
//! `docker-registry` side by side, one large blob and many small blobs with 16 concurrent
//! clients, then the cold and warm pull time of an image through the mirror (upstream:
//! `docker-registry`, or this registry when `docker-registry` is not installed), with the
//! phases of each cold blob fetch, beside the peer: `docker-registry` as a pull-through cache
//! (`proxy.remoteurl`) of the same upstream, new each round.
//!
//! The small-blob rate is measured twice: by this program's own client (reqwest, 16 tasks,
//! keep-alive) and by an independent load generator, Debian's `wrk` (16 keep-alive
//! connections, 2 threads, cycling over the same blobs), against both registries in the same
//! run. `wrk` is skipped with a note when it is not installed.
//!
//! Run: `cargo run --release -p kiln-registry-mirror --example registry-bench`
//! Sizes: KILN_BENCH_LARGE_MB (default 256), KILN_BENCH_SMALL_COUNT (default 1000),
//! KILN_BENCH_SMALL_KB (default 16), KILN_BENCH_LAYER_MB (default 32, four layers),
//! KILN_BENCH_ROUNDS (default 3: direct, cold and warm pulls, a new mirror each round).
//! Parts: KILN_BENCH_PARTS, a comma-separated subset of `throughput,pull,peer` (default all:
//! the throughput tables, the image pulls through the mirror, the peer's pull-through cache
//! beside them), e.g. `KILN_BENCH_PARTS=pull` to profile the mirror alone. To profile only
//! the cold pulls: `mkfifo ctl ack; KILN_BENCH_PERF_CTL=ctl KILN_BENCH_PERF_ACK=ack perf record
//! -g --control fifo:ctl,ack -D -1 -- target/release/examples/registry-bench`.

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

/// Profiles only the cold pulls: with `KILN_BENCH_PERF_CTL=FIFO` (and `KILN_BENCH_PERF_ACK`),
/// writes `enable`/`disable` to a `perf record --control fifo:FIFO,ACK -D -1` around each one.
fn perf_control(cmd: &str) {
    use std::io::{Read as _, Write as _};
    let Some(ctl) = std::env::var_os("KILN_BENCH_PERF_CTL") else {
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(ctl) {
        let _ = writeln!(f, "{cmd}");
    }
    if let Some(ack) = std::env::var_os("KILN_BENCH_PERF_ACK")
        && let Ok(mut f) = std::fs::File::open(ack)
    {
        let _ = f.read(&mut [0u8; 5]);
    }
}

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat` (10 ms ticks).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 12 and 13.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
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
    registry: Arc<Registry>,
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
        kiln_registry_mirror::router(registry.clone()),
        1024,
        async {
            let _ = rx.await;
        },
    ));
    Ok(Server {
        url,
        registry,
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

/// Debian's `docker-registry`; with `proxy_of`, as a pull-through cache of that registry (its
/// `proxy.remoteurl`), the peer of the mirror.
async fn start_docker_registry(proxy_of: Option<&str>) -> anyhow::Result<Option<DockerRegistry>> {
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
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{}",
            dir.path().join("data").display(),
            proxy_of.map_or(String::new(), |u| format!("proxy:\n  remoteurl: {u}\n"))
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
    small_digests: Vec<Digest>,
}

const WRK_SECS: u64 = 3;

/// Requests per second of `wrk` (16 keep-alive connections, 2 threads, `WRK_SECS` s) cycling
/// over the small blobs; `None` when `wrk` is not installed.
fn wrk_small(url: &str, digests: &[Digest]) -> anyhow::Result<Option<f64>> {
    let found = Command::new("sh")
        .args(["-c", "command -v wrk"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("paths.lua");
    let mut lua = String::from("local paths = {\n");
    for d in digests {
        lua.push_str(&format!("  \"/v2/bench/small/blobs/{d}\",\n"));
    }
    // Each wrk thread starts at a different blob, as the reqwest clients do.
    lua.push_str(
        "}\nlocal i = math.random(#paths)\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format(\"GET\", paths[i])\nend\n",
    );
    std::fs::write(&script, lua)?;
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{CLIENTS}"),
            &format!("-d{WRK_SECS}s"),
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    if let Some(errors) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        bail!("wrk against {url}: {errors}");
    }
    Ok(Some(rps))
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
    let digests = Arc::new(small_digests.clone());
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
        small_digests,
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
/// Returns the total time, the bytes, and when the first blob byte arrived.
async fn pull_image(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<(Duration, u64, Duration)> {
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
    let first = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let mut tasks = Vec::new();
    for d in digests {
        let (http, url, first) = (http.clone(), url.to_owned(), first.clone());
        tasks.push(tokio::spawn(async move {
            let d: Digest = d.parse()?;
            let mut r = http
                .get(format!("{url}/v2/bench/image/blobs/{d}"))
                .send()
                .await?;
            anyhow::ensure!(
                r.status().is_success(),
                "GET {d} from {url}: {}",
                r.status()
            );
            let mut n = 0u64;
            while let Some(c) = r.chunk().await? {
                if n == 0 {
                    let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
                    let at = t.elapsed();
                    *f = Some(f.map_or(at, |x| x.min(at)));
                }
                n += c.len() as u64;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let first = first
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or_default();
    Ok((t.elapsed(), total, first))
}

/// What storing `mib` MiB costs on this machine, without any registry: written to a new file
/// (the page cache takes new pages, as a cold pull's store does), again right after that file
/// was deleted (its pages are reused), and over the cached file in place. On the development
/// machine (a virtual machine whose host takes back free guest memory) the first is often many
/// times the others. The direct pull pays none of this (the upstream serves from a warm page
/// cache); a cold pull through any caching mirror pays it once per byte stored.
fn fresh_page_cost(mib: usize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let dir = tempfile::tempdir()?;
    let buf = vec![0x5au8; 1 << 20];
    let write = |path: &std::path::Path, truncate: bool| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(truncate)
            .open(path)?;
        for _ in 0..mib {
            f.write_all(&buf)?;
        }
        Ok(t.elapsed())
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let new = write(&a, true)?;
    std::fs::remove_file(&a)?;
    let reused = write(&b, true)?;
    let cached = write(&b, false)?;
    println!(
        "storing {mib} MiB on this machine (no registry): into a new file {:.1} ms, again right after deleting it {:.1} ms, over the cached file {:.1} ms",
        new.as_secs_f64() * 1e3,
        reused.as_secs_f64() * 1e3,
        cached.as_secs_f64() * 1e3
    );
    Ok(())
}

/// The throughput tables: one large blob, many small blobs, and the small blobs again with
/// `wrk`, this registry beside `docker-registry`.
async fn throughput(
    http: &reqwest::Client,
    docker: Option<&DockerRegistry>,
    large: &Bytes,
    small: &[Bytes],
) -> anyhow::Result<()> {
    println!(
        "registry blob pull throughput on loopback ({} cores; client in the same process)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  large: one {} MiB blob, one client, best of 3",
        large.len() >> 20
    );
    println!(
        "  small: {} blobs of {} KiB, {CLIENTS} concurrent clients, each pulls every blob",
        small.len(),
        small.first().map_or(0, |b| b.len() >> 10)
    );
    println!(
        "{:<22} {:>14} {:>14} {:>14}",
        "registry", "large MiB/s", "small req/s", "small MiB/s"
    );
    let ours = start_ours(None).await?;
    let t = measure(http, &ours.url, large, small).await?;
    println!(
        "{:<22} {:>14.1} {:>14.0} {:>14.1}",
        "kiln-registry-mirror", t.large_mbps, t.small_rps, t.small_mbps
    );
    let mut small_rates = vec![("kiln-registry-mirror", ours.url.clone(), t)];
    match docker {
        Some(d) => {
            let t = measure(http, &d.url, large, small).await?;
            println!(
                "{:<22} {:>14.1} {:>14.0} {:>14.1}",
                "docker-registry", t.large_mbps, t.small_rps, t.small_mbps
            );
            small_rates.push(("docker-registry", d.url.clone(), t));
        }
        None => println!(
            "{:<22} skipped: docker-registry is not installed",
            "docker-registry"
        ),
    }

    println!();
    println!("small blobs, two load generators, {CLIENTS} keep-alive connections each, same blobs");
    println!(
        "{:<22} {:>18} {:>18}",
        "registry", "reqwest req/s", "wrk req/s"
    );
    for (name, url, t) in &small_rates {
        let wrk = match wrk_small(url, &t.small_digests)? {
            Some(rps) => format!("{rps:.0}"),
            None => "skipped: no wrk".to_owned(),
        };
        println!("{name:<22} {:>18.0} {wrk:>18}", t.small_rps);
    }

    Ok(())
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
    let parts =
        std::env::var("KILN_BENCH_PARTS").unwrap_or_else(|_| "throughput,pull,peer".to_owned());
    let part = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let docker = start_docker_registry(None).await?;
    if part("throughput") {
        throughput(&http, docker.as_ref(), &large, &small).await?;
    }
    if !part("pull") {
        return Ok(());
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
    let rounds = env_or("KILN_BENCH_ROUNDS", 3).max(1);
    println!();
    fresh_page_cost(4 * layer_mb)?;
    println!(
        "image pull through the mirror (upstream: {upstream_name}; 4 layers of {layer_mb} MiB + config, blobs pulled concurrently; {rounds} rounds, each: direct, then cold through a new mirror with empty storage, then warm)"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut ratios = Vec::new();
    let mut peer_ratios = Vec::new();
    for round in 1..=rounds {
        let mirror = Mirror::new(
            vec![UpstreamConfig::parse(&format!("docker.io={upstream_url}"))?],
            None,
            Duration::from_secs(3600),
        )?;
        let mirror = start_ours(Some(mirror)).await?;
        let upstream_pid = docker.as_ref().map(|d| d.child.id());
        let cpu = || {
            (
                cpu_time(std::process::id()),
                upstream_pid.map_or(Duration::ZERO, cpu_time),
            )
        };
        let direct_before = cpu();
        let (direct, n, direct_first) = pull_image(&http, &upstream_url).await?;
        let direct_after = cpu();
        perf_control("enable");
        let before = cpu();
        let (cold, _, cold_first) = pull_image(&http, &mirror.url).await?;
        let after = cpu();
        perf_control("disable");
        let m = mirror.registry.mirror.as_ref().context("mirror")?;
        // Storing (fsync, rename) goes on after the clients' bodies ended: let it finish, so
        // that the warm pull is served from the store and the profile is complete.
        let digests: Vec<Digest> = {
            let r = http
                .get(format!("{}/v2/bench/image/manifests/v1", mirror.url))
                .header("accept", ACCEPT_ALL)
                .send()
                .await?;
            let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
            std::iter::once(&v["config"])
                .chain(v["layers"].as_array().into_iter().flatten())
                .filter_map(|d| d["digest"].as_str()?.parse().ok())
                .collect()
        };
        for d in &digests {
            m.settled(d).await;
        }
        let (warm, _, _) = pull_image(&http, &mirror.url).await?;
        let ratio = cold.as_secs_f64() / direct.as_secs_f64();
        ratios.push(ratio);
        // The peer: docker-registry as a pull-through cache of the same upstream, new and
        // empty each round, the same client.
        let peer = match docker {
            Some(_) if part("peer") => match start_docker_registry(Some(&upstream_url)).await? {
                Some(p) => {
                    let (pcold, _, _) = pull_image(&http, &p.url).await?;
                    let (pwarm, _, _) = pull_image(&http, &p.url).await?;
                    let r = pcold.as_secs_f64() / direct.as_secs_f64();
                    peer_ratios.push(r);
                    format!(
                        "   docker-registry proxy: cold {:>6.3} s ({r:.2} x direct), warm {:>6.3} s",
                        pcold.as_secs_f64(),
                        pwarm.as_secs_f64()
                    )
                }
                None => String::new(),
            },
            _ => String::new(),
        };
        println!(
            "  round {round}: direct {:>6.3} s (first blob byte {:>5.1} ms; {:.1} MiB)   cold {:>6.3} s (first blob byte {:>5.1} ms; {ratio:.2} x direct)   warm {:>6.3} s{peer}",
            direct.as_secs_f64(),
            ms(direct_first),
            n as f64 / (1 << 20) as f64,
            cold.as_secs_f64(),
            ms(cold_first),
            warm.as_secs_f64(),
        );
        println!(
            "    CPU time (10 ms ticks) of the direct pull: client {:.0} ms, upstream {:.0} ms; of the cold pull: this process (mirror and client) {:.0} ms, upstream {:.0} ms, in {:.0} ms of wall time on {} cores",
            ms(direct_after.0.saturating_sub(direct_before.0)),
            ms(direct_after.1.saturating_sub(direct_before.1)),
            ms(after.0.saturating_sub(before.0)),
            ms(after.1.saturating_sub(before.1)),
            ms(cold),
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        );
        println!(
            "    cold fetch phases per blob, ms from the request to the upstream (upstream headers; first byte to clients; last byte verified, bodies end; all on disk; then fsync; rename + link):"
        );
        for t in m
            .stats
            .fetch_timings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            println!(
                "    {:>9.1} MiB  headers {:>6.1}  first byte {:>6.1}  verified {:>6.1}  on disk {:>6.1}  fsync {:>6.1}  commit {:>5.1}  ({} chunks of {:.1} KiB)",
                t.bytes as f64 / (1 << 20) as f64,
                ms(t.headers),
                ms(t.first_byte),
                ms(t.verified),
                ms(t.on_disk),
                ms(t.sync),
                ms(t.commit),
                t.chunks,
                t.bytes as f64 / 1024.0 / t.chunks.max(1) as f64
            );
        }
    }
    let median = |name: &str, mut ratios: Vec<f64>| {
        if ratios.is_empty() {
            return;
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "  {name} cold / direct: median {:.2} x (rounds: {})",
            ratios[ratios.len() / 2],
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    median("kiln mirror", ratios);
    median("docker-registry proxy", peer_ratios);
    Ok(())
}
