//! Side-by-side benchmark of the air-gap helpers against Debian peers, in one run:
//! - DNS: queries/s and latency of the lab DNS and of `unbound`, both serving the same local
//!   names on loopback, driven by `dnsperf` over UDP;
//! - proxy: requests/s (new connection per request, 32 at once), bulk throughput of one large
//!   GET, and the latency each adds over a direct request, for the lab proxy and `tinyproxy`,
//!   relaying to the same loopback origin; each proxy runs in its own process, twice each,
//!   interleaved.
//!
//! Run: `cargo run --release -p kiln-airgap --example airgap-bench` (needs dnsperf, unbound, tinyproxy;
//! `BENCH_SECONDS` sets the length of each timed run, default 5).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kiln_airgap::allow::AllowList;
use kiln_airgap::audit::AuditLog;
use kiln_airgap::dns::{DnsConfig, DnsSockets, LabDns};
use kiln_airgap::proxy::{self, Limits, Proxy};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const NAMES: usize = 100;
const DOMAIN: &str = "kiln.bench";
const CONCURRENCY: usize = 32;
const BULK_BYTES: usize = 128 << 20;
const LATENCY_SAMPLES: usize = 500;

fn seconds() -> u64 {
    std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

fn free_port() -> anyhow::Result<u16> {
    // A free UDP port whose TCP twin is free too; another socket may hold the TCP side.
    let mut last = None;
    for _ in 0..50 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        match std::net::TcpListener::bind(s.local_addr()?) {
            Ok(t) => return Ok(t.local_addr()?.port()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no free port"), anyhow::Error::from))
}

/// Waits until `addr` accepts TCP (peers started as processes).
fn wait_tcp(addr: SocketAddr) -> anyhow::Result<()> {
    kiln_os_api::wait::until_blocking(
        format!("{addr} accepts connections"),
        kiln_os_api::wait::Poll::every(Duration::from_millis(50), Duration::from_secs(15)),
        || std::net::TcpStream::connect(addr).map(|_| ()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut std::process::Command) -> anyhow::Result<Child> {
    Ok(Child(
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?,
    ))
}

// ---------------------------------------------------------------- DNS

struct DnsResult {
    qps: f64,
    latency_ms: f64,
    lost: String,
}

fn dnsperf(port: u16, datafile: &Path) -> anyhow::Result<DnsResult> {
    let out = std::process::Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(datafile)
        .args([
            "-l",
            &seconds().to_string(),
            "-c",
            "8",
            "-T",
            "2",
            "-q",
            "200",
        ])
        .output()
        .context("running dnsperf (apt-get install dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> Option<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
    };
    let qps: f64 = field("Queries per second")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("dnsperf printed no rate:\n{text}"))?;
    let latency: f64 = field("Average Latency (s)")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let lost = text
        .lines()
        .find(|l| l.trim_start().starts_with("Queries lost"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default();
    Ok(DnsResult {
        qps,
        latency_ms: latency * 1000.0,
        lost,
    })
}

fn bench_dns(dir: &Path) -> anyhow::Result<Vec<(String, DnsResult)>> {
    let names: Vec<(String, String)> = (0..NAMES)
        .map(|i| {
            (
                format!("node-{i}"),
                format!("10.5.{}.{}", i / 250, i % 250 + 2),
            )
        })
        .collect();
    let data = dir.join("queries.txt");
    std::fs::write(
        &data,
        names
            .iter()
            .map(|(n, _)| format!("{n}.{DOMAIN} A\n"))
            .collect::<String>(),
    )?;
    let mut results = Vec::new();

    // Lab DNS, on its own runtime with two workers.
    let port = free_port()?;
    let mut config = DnsConfig::new(vec![format!("127.0.0.1:{port}").parse()?]);
    config.domain = DOMAIN.into();
    config.airgapped = true;
    for (n, ip) in &names {
        config.records.insert(n.clone(), vec![ip.parse()?]);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let config = config.clone();
        rt.block_on(async move {
            let sockets = DnsSockets::bind(&config.listen).await?;
            let handler = LabDns::new(&config, AuditLog::discard(), Path::new("/etc/resolv.conf"))?;
            Ok::<_, anyhow::Error>(tokio::spawn(kiln_airgap::dns::serve(
                sockets,
                handler,
                async {
                    let _ = rx.await;
                },
            )))
        })?
    };
    results.push(("lab DNS".to_owned(), dnsperf(port, &data)?));
    let _ = tx.send(());
    let _ = rt.block_on(server);
    drop(rt);

    // unbound, two threads, the same names as a static local zone.
    let port = free_port()?;
    let local_data: String = names
        .iter()
        .map(|(n, ip)| format!("  local-data: \"{n}.{DOMAIN}. 60 IN A {ip}\"\n"))
        .collect();
    let conf = dir.join("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  \
             chroot: \"\"\n  username: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  \
             use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  num-threads: 2\n  \
             so-reuseport: yes\n  access-control: 127.0.0.0/8 allow\n  \
             local-zone: \"{DOMAIN}.\" static\n{local_data}remote-control:\n  control-enable: no\n",
            dir = dir.display()
        ),
    )?;
    let _unbound = spawn(
        std::process::Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&conf),
    )?;
    wait_tcp(format!("127.0.0.1:{port}").parse()?)?;
    results.push(("unbound 2 threads".to_owned(), dnsperf(port, &data)?));
    Ok(results)
}

// ---------------------------------------------------------------- proxy

/// A loopback origin: `/small` answers 13 bytes, `/big` answers [`BULK_BYTES`].
async fn origin() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let big = Arc::new(vec![b'x'; 1 << 20]);
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let big = big.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let is_big = buf.windows(4).any(|w| w == b"/big");
                let len = if is_big { BULK_BYTES } else { 13 };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                if is_big {
                    for _ in 0..BULK_BYTES / big.len() {
                        if s.write_all(&big).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let _ = s.write_all(b"hello, world\n").await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// One GET (through `proxy` when given); returns the bytes of the answer.
async fn get(proxy: Option<SocketAddr>, origin: SocketAddr, path: &str) -> anyhow::Result<u64> {
    let (connect_to, target) = match proxy {
        Some(p) => (p, format!("http://{origin}{path}")),
        None => (origin, path.to_owned()),
    };
    let mut s = TcpStream::connect(connect_to).await?;
    let _ = s.set_nodelay(true);
    let req = format!("GET {target} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await?;
    if &first != b"HTTP/1.1 200" && &first != b"HTTP/1.0 200" {
        bail!("answer {:?}", String::from_utf8_lossy(&first));
    }
    let mut total = 12u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total)
}

struct ProxyResult {
    rps: f64,
    errors: u64,
    mb_s: f64,
    p50_us: f64,
    p99_us: f64,
}

async fn measure(proxy: Option<SocketAddr>, origin: SocketAddr) -> anyhow::Result<ProxyResult> {
    // Requests per second, CONCURRENCY clients, new connection per request.
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds());
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (done, errors) = (done.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match get(proxy, origin, "/small").await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await?;
    }
    let rps = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    // Latency, one client, sequential.
    let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
    for _ in 0..LATENCY_SAMPLES {
        let t = Instant::now();
        get(proxy, origin, "/small").await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    // Bulk throughput, one stream.
    let t = Instant::now();
    let bytes = get(proxy, origin, "/big").await?;
    let mb_s = bytes as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    Ok(ProxyResult {
        rps,
        errors: errors.load(Ordering::Relaxed),
        mb_s,
        p50_us: samples[samples.len() / 2],
        p99_us: samples[samples.len() * 99 / 100],
    })
}

fn bench_proxy(dir: &Path) -> anyhow::Result<Vec<(String, ProxyResult)>> {
    // Client and origin on one runtime, the lab proxy on another (two workers each).
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let origin = client_rt.block_on(origin())?;
    let mut results = Vec::new();
    results.push((
        "direct (no proxy)".to_owned(),
        client_rt.block_on(measure(None, origin))?,
    ));

    // The lab proxy in its own process, like tinyproxy: this binary again with `serve-proxy`.
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let lab = spawn(
        std::process::Command::new(std::env::current_exe()?)
            .arg("serve-proxy")
            .arg(addr.to_string())
            .arg(format!("127.0.0.1:{}", origin.port()))
            .arg(dir.join("bench-audit.jsonl")),
    )?;
    wait_tcp(addr)?;
    let lab_addr = addr;
    let port = free_port()?;
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {port}\nListen 127.0.0.1\nTimeout 600\n\
             MaxClients 1024\nLogLevel Critical\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
        ),
    )?;
    let _tinyproxy = spawn(
        std::process::Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf),
    )?;
    let tiny_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    wait_tcp(tiny_addr)?;
    // Twice each, interleaved, so a change in the machine's load shows as spread.
    for round in 1..=2 {
        results.push((
            format!("lab proxy #{round}"),
            client_rt.block_on(measure(Some(lab_addr), origin))?,
        ));
        results.push((
            format!("tinyproxy #{round}"),
            client_rt.block_on(measure(Some(tiny_addr), origin))?,
        ));
    }
    drop(lab);
    Ok(results)
}

/// `bench serve-proxy LISTEN ALLOW AUDIT`: the lab proxy alone in this process.
fn serve_proxy(listen: &str, allow: &str, audit: &str) -> anyhow::Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("BENCH_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async {
        let listener = proxy::bind(listen.parse()?).await?;
        let allow = AllowList(vec![allow.parse()?]);
        let p = Arc::new(Proxy::new(
            allow,
            AuditLog::open(Path::new(audit))?,
            Limits::default(),
        ));
        proxy::serve(listener, None, p, std::future::pending()).await;
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve-proxy") && args.len() == 5 {
        return serve_proxy(&args[2], &args[3], &args[4]);
    }
    let dir = tempfile::tempdir()?;
    // The tempdir must be readable by tinyproxy's user for its config.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    println!(
        "kiln-airgap bench: {} s per timed run, {} cores",
        seconds(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!();
    println!("DNS: dnsperf -c 8 -T 2 -q 200 over UDP, {NAMES} local A names, loopback");
    println!(
        "{:<28} {:>12} {:>16} {:>14}",
        "server", "queries/s", "avg latency ms", "lost"
    );
    for (name, r) in bench_dns(dir.path())? {
        println!(
            "{name:<28} {:>12.0} {:>16.3} {:>14}",
            r.qps, r.latency_ms, r.lost
        );
    }
    println!();
    println!(
        "Proxy: GET to a loopback origin; req/s with {CONCURRENCY} clients (new connection each), \
         one {} MiB GET, {LATENCY_SAMPLES} sequential GETs",
        BULK_BYTES >> 20
    );
    println!(
        "{:<22} {:>10} {:>8} {:>10} {:>10} {:>10} {:>14}",
        "path", "req/s", "errors", "MiB/s", "p50 us", "p99 us", "p50 added us"
    );
    let results = bench_proxy(dir.path())?;
    let base = results.first().map(|r| r.1.p50_us).unwrap_or(0.0);
    for (name, r) in &results {
        println!(
            "{name:<22} {:>10.0} {:>8} {:>10.0} {:>10.0} {:>10.0} {:>14.0}",
            r.rps,
            r.errors,
            r.mb_s,
            r.p50_us,
            r.p99_us,
            r.p50_us - base
        );
    }
    Ok(())
}
