//! Benchmark (not a test): kiln-lb against HAProxy in front of the same three echo backends on
//! loopback, in one run. Measures throughput, added latency, and failover under a steady
//! connection load when one backend is killed with SIGKILL.
//!
//! ```text
//! cargo run --release -p kiln-lb --example lb-bench
//! ```
//!
//! Backends and the kiln balancer run as child processes (this binary re-executed with
//! `backend PORT` or `lb CONFIG SOCKET`); HAProxy is Debian's `haproxy`, started with a
//! generated TCP-mode config using the same health settings (active checks every 500 ms,
//! rise 2, fall 2, plus `observe layer4` passive marking and `option redispatch`, the
//! closest equivalents of kiln-lb's passive marking and retry-next-upstream rule).

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::io::{BufRead as _, BufReader as StdBufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixStream};

const HEALTH_INTERVAL_MS: u64 = 500;
const HEALTH_TIMEOUT_MS: u64 = 300;
const RISE: u32 = 2;
const FALL: u32 = 2;
const THROUGHPUT_CONNS: usize = 4;
const THROUGHPUT_SECS: u64 = 3;
const RTT_ROUNDS: usize = 10_000;
const CONNECT_ROUNDS: usize = 2_000;
const LOAD_WORKERS: usize = 10;
const LOAD_PERIOD: Duration = Duration::from_millis(10); // 100 connections/s per worker
const LOAD_BEFORE: Duration = Duration::from_secs(2);
const LOAD_AFTER: Duration = Duration::from_secs(4);
/// Every measurement is repeated, interleaved over the targets; the table shows the median
/// (and, for failover, every round), since two cores shared with the load generator are noisy.
const ROUNDS: usize = 3;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("backend") => run_backend(args[2].parse()?),
        Some("lb") => run_lb(PathBuf::from(&args[2]), PathBuf::from(&args[3])),
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(orchestrate()),
    }
}

// ---------------------------------------------------------------- child processes

/// An echo server on 127.0.0.1:`port`; prints "ready" once listening.
fn run_backend(port: u16) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("ready");
        loop {
            let (mut s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

/// kiln-lb exactly as `kiln lb run` runs it, until SIGTERM.
fn run_lb(config: PathBuf, socket: PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let opts = kiln_lb::daemon::RunOptions {
            config_path: config,
            control_socket: Some(socket),
        };
        kiln_lb::daemon::run(&opts, async {
            term.recv().await;
        })
        .await?;
        Ok(())
    })
}

/// Kills its child on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_backend(port: u16) -> anyhow::Result<Proc> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["backend", &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    StdBufReader::new(child.stdout.take().context("backend stdout")?).read_line(&mut line)?;
    if line.trim() != "ready" {
        bail!("backend on port {port} did not start");
    }
    Ok(Proc(child))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- the balancers' views

#[derive(Debug, Clone, Copy, PartialEq)]
struct DeadView {
    /// Every connection attempt the balancer made to the dead upstream, as counted by it.
    attempts: u64,
    /// Whether the balancer has marked it down.
    down: bool,
}

enum Target {
    Direct(SocketAddr),
    Kiln { addr: SocketAddr, socket: PathBuf },
    Haproxy { addr: SocketAddr, socket: PathBuf },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Direct(_) => "direct",
            Target::Kiln { .. } => "kiln-lb",
            Target::Haproxy { .. } => "haproxy",
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Target::Direct(a) | Target::Kiln { addr: a, .. } | Target::Haproxy { addr: a, .. } => {
                *a
            }
        }
    }

    /// What the balancer says about the upstream at `dead`.
    async fn view(&self, dead: SocketAddr) -> anyhow::Result<DeadView> {
        match self {
            Target::Direct(_) => bail!("no balancer"),
            Target::Kiln { socket, .. } => {
                let s = kiln_lb::control::status(socket).await?;
                let u = s.frontends[0]
                    .upstreams
                    .iter()
                    .find(|u| u.address == dead)
                    .context("dead upstream not listed")?;
                Ok(DeadView {
                    attempts: u.connections_total + u.connect_failures,
                    down: u.health == kiln_lb::Health::Unhealthy,
                })
            }
            Target::Haproxy { socket, .. } => {
                let csv = haproxy_stats(socket).await?;
                let mut lines = csv.lines();
                let header: Vec<&str> = lines
                    .next()
                    .context("empty stats")?
                    .trim_start_matches("# ")
                    .split(',')
                    .collect();
                let col = |n: &str| header.iter().position(|h| *h == n).context("stats column");
                let (sv, stot, econ, wretr, wredis, status) = (
                    col("svname")?,
                    col("stot")?,
                    col("econ")?,
                    col("wretr")?,
                    col("wredis")?,
                    col("status")?,
                );
                let want = format!("s{}", dead.port());
                for line in lines {
                    let f: Vec<&str> = line.split(',').collect();
                    if f.get(sv) == Some(&want.as_str()) {
                        let n =
                            |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                        return Ok(DeadView {
                            attempts: n(stot) + n(econ) + n(wretr) + n(wredis),
                            down: f.get(status).is_some_and(|s| s.starts_with("DOWN")),
                        });
                    }
                }
                bail!("server {want} not in haproxy stats")
            }
        }
    }

    /// Whether every upstream is up again.
    async fn all_up(&self, backends: &[SocketAddr]) -> bool {
        for b in backends {
            match self.view(*b).await {
                Ok(v) if !v.down => {}
                _ => return false,
            }
        }
        if let Target::Kiln { socket, .. } = self {
            // Unknown counts as up for routing, but wait for the checks to confirm.
            return kiln_lb::control::status(socket).await.is_ok_and(|s| {
                s.frontends[0]
                    .upstreams
                    .iter()
                    .all(|u| u.health == kiln_lb::Health::Healthy)
            });
        }
        true
    }
}

async fn haproxy_stats(socket: &Path) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket).await?;
    s.write_all(b"show stat\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn haproxy_config(listen: SocketAddr, backends: &[SocketAddr], socket: &Path) -> String {
    let mut c = format!(
        "global\n  nbthread 2\n  maxconn 4000\n  stats socket {} mode 600 level admin\n\
         defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  \
         timeout check {HEALTH_TIMEOUT_MS}ms\n  retries 3\n  option redispatch 1\n\
         frontend fe\n  bind {listen}\n  default_backend be\n\
         backend be\n  balance roundrobin\n  default-server check inter {HEALTH_INTERVAL_MS} \
         rise {RISE} fall {FALL} observe layer4 error-limit {FALL} on-error mark-down\n",
        socket.display()
    );
    for b in backends {
        c.push_str(&format!("  server s{} {b}\n", b.port()));
    }
    c
}

// ---------------------------------------------------------------- measurements

/// MB/s echoed through `addr` over a few long connections.
async fn throughput(addr: SocketAddr) -> anyhow::Result<f64> {
    let end = tokio::time::Instant::now() + Duration::from_secs(THROUGHPUT_SECS);
    let mut tasks = Vec::new();
    for _ in 0..THROUGHPUT_CONNS {
        let s = TcpStream::connect(addr).await?;
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5a_u8; 64 * 1024];
            while tokio::time::Instant::now() < end {
                if w.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            while let Ok(Ok(n)) = tokio::time::timeout_at(end, r.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            writer.abort();
            total
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / 1e6 / THROUGHPUT_SECS as f64)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Round trips of 64-byte messages on one open connection: (p50, p99) in µs.
async fn rtt(addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(RTT_ROUNDS);
    for i in 0..RTT_ROUNDS + 500 {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut back).await?;
        if i >= 500 {
            samples.push(t.elapsed());
        }
    }
    samples.sort_unstable();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

/// One short connection: connect, echo 32 bytes, close.
async fn one_request(addr: SocketAddr) -> anyhow::Result<()> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let msg = [9u8; 32];
        s.write_all(&msg).await?;
        let mut back = [0u8; 32];
        s.read_exact(&mut back).await?;
        anyhow::ensure!(back == msg, "echo changed");
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("timed out")?
}

/// New connection per request: (p50, p99) in µs.
async fn connect_rtt(addr: SocketAddr) -> anyhow::Result<(f64, f64)> {
    let mut samples = Vec::with_capacity(CONNECT_ROUNDS);
    for _ in 0..CONNECT_ROUNDS {
        let t = Instant::now();
        one_request(addr).await?;
        samples.push(t.elapsed());
    }
    samples.sort_unstable();
    Ok((percentile(&samples, 0.5), percentile(&samples, 0.99)))
}

struct Failover {
    requests_before: u64,
    requests_after: u64,
    failed: u64,
    failed_before: u64,
    first_error: Option<String>,
    marked_down_ms: Option<f64>,
    last_attempt_ms: f64,
    attempts_after_kill: u64,
}

/// Steady short-connection load through `target`; kills `victim` (serving `dead`) halfway.
async fn failover(
    target: &Target,
    victim: &mut Option<Proc>,
    dead: SocketAddr,
) -> anyhow::Result<Failover> {
    let addr = target.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let before = Arc::new(AtomicU64::new(0));
    let after = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let failed_before = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut workers = Vec::new();
    for _ in 0..LOAD_WORKERS {
        let (stop, killed, before, after, failed, failed_before) = (
            stop.clone(),
            killed.clone(),
            before.clone(),
            after.clone(),
            failed.clone(),
            failed_before.clone(),
        );
        let first_error = first_error.clone();
        workers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOAD_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let was_killed = killed.load(Ordering::Relaxed);
                let result = one_request(addr).await;
                let ok = result.is_ok();
                if let Err(e) = result {
                    let mut first = first_error.lock().unwrap();
                    if first.is_none() {
                        *first = Some(format!("{e:#}"));
                    }
                }
                let (count, fails) = if was_killed || killed.load(Ordering::Relaxed) {
                    (&after, &failed)
                } else {
                    (&before, &failed_before)
                };
                count.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    fails.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(LOAD_BEFORE).await;
    let start_view = target.view(dead).await?;
    if let Some(mut p) = victim.take() {
        p.0.kill()?;
        p.0.wait()?;
    }
    let t0 = Instant::now();
    killed.store(true, Ordering::Relaxed);
    let mut last = start_view;
    let mut last_change = t0;
    let mut marked_down = None;
    while t0.elapsed() < LOAD_AFTER {
        let v = target.view(dead).await?;
        if v.attempts != last.attempts {
            last_change = Instant::now();
        }
        if v.down && marked_down.is_none() {
            marked_down = Some(t0.elapsed());
        }
        last = v;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await?;
    }
    Ok(Failover {
        requests_before: before.load(Ordering::Relaxed),
        requests_after: after.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        failed_before: failed_before.load(Ordering::Relaxed),
        first_error: first_error.lock().unwrap().clone(),
        marked_down_ms: marked_down.map(|d| d.as_secs_f64() * 1e3),
        last_attempt_ms: last_change.duration_since(t0).as_secs_f64() * 1e3,
        attempts_after_kill: last.attempts - start_view.attempts,
    })
}

// ---------------------------------------------------------------- the run

async fn orchestrate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let haproxy_version = Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        });
    if haproxy_version.is_none() {
        bail!("haproxy is not installed: run scripts/install-deps (Debian package `haproxy`)");
    }

    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Result<_, _>>()?;
    let backends: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut procs: Vec<Option<Proc>> = ports
        .iter()
        .map(|p| spawn_backend(*p).map(Some))
        .collect::<Result<_, _>>()?;

    // kiln-lb
    let kiln_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let kiln_sock = dir.path().join("kiln-lb.sock");
    let mut config = kiln_lb::Config::new(vec![kiln_lb::FrontendConfig {
        name: "bench".into(),
        listen: kiln_addr,
        upstreams: backends.clone(),
    }]);
    config.health = kiln_lb::HealthConfig {
        interval_ms: HEALTH_INTERVAL_MS,
        timeout_ms: HEALTH_TIMEOUT_MS,
        rise: RISE,
        fall: FALL,
    };
    let kiln_config = dir.path().join("kiln-lb.yaml");
    std::fs::write(&kiln_config, config.to_yaml())?;
    let _kiln = Proc(
        Command::new(std::env::current_exe()?)
            .arg("lb")
            .arg(&kiln_config)
            .arg(&kiln_sock)
            .spawn()?,
    );

    // HAProxy
    let ha_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let ha_sock = dir.path().join("haproxy.sock");
    let ha_config = dir.path().join("haproxy.cfg");
    std::fs::write(&ha_config, haproxy_config(ha_addr, &backends, &ha_sock))?;
    let _haproxy = Proc(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&ha_config)
            .stdout(Stdio::null())
            .spawn()
            .context("starting haproxy")?,
    );

    wait_listening(kiln_addr).await?;
    wait_listening(ha_addr).await?;
    let direct = Target::Direct(backends[0]);
    let kiln = Target::Kiln {
        addr: kiln_addr,
        socket: kiln_sock,
    };
    let haproxy = Target::Haproxy {
        addr: ha_addr,
        socket: ha_sock,
    };
    wait_all_up(&[&kiln, &haproxy], &backends).await?;

    let targets = [&direct, &kiln, &haproxy];
    let mut tput = vec![Vec::new(); 3];
    let mut rtts = vec![Vec::new(); 3];
    let mut crtts = vec![Vec::new(); 3];
    for round in 1..=ROUNDS {
        for (i, t) in targets.iter().enumerate() {
            eprintln!("round {round}/{ROUNDS}: measuring {} ...", t.name());
            tput[i].push(throughput(t.addr()).await?);
            rtts[i].push(rtt(t.addr()).await?);
            crtts[i].push(connect_rtt(t.addr()).await?);
        }
    }
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let tput: Vec<f64> = tput.iter().map(|v| med(v)).collect();
    let pair = |v: &[(f64, f64)]| {
        (
            med(&v.iter().map(|p| p.0).collect::<Vec<_>>()),
            med(&v.iter().map(|p| p.1).collect::<Vec<_>>()),
        )
    };
    let rtts: Vec<(f64, f64)> = rtts.iter().map(|v| pair(v)).collect();
    let crtts: Vec<(f64, f64)> = crtts.iter().map(|v| pair(v)).collect();

    let mut fail: [Vec<Failover>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=ROUNDS {
        for (i, t) in [&kiln, &haproxy].into_iter().enumerate() {
            eprintln!("round {round}/{ROUNDS}: failover through {} ...", t.name());
            let victim = 2;
            fail[i].push(failover(t, &mut procs[victim], backends[victim]).await?);
            procs[victim] = Some(spawn_backend(ports[victim])?);
            wait_all_up(&[&kiln, &haproxy], &backends).await?;
        }
    }

    println!();
    println!(
        "kiln-lb vs {} on 127.0.0.1: 3 echo backends, {} CPUs, median of {ROUNDS} rounds; health every {HEALTH_INTERVAL_MS} ms, timeout {HEALTH_TIMEOUT_MS} ms, rise {RISE}, fall {FALL}",
        haproxy_version.unwrap_or_default(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "{:<46} {:>10} {:>10} {:>10}",
        "", "direct", "kiln-lb", "haproxy"
    );
    let row = |name: &str, v: [String; 3]| {
        println!("{name:<46} {:>10} {:>10} {:>10}", v[0], v[1], v[2]);
    };
    let f1 = |x: f64| format!("{x:.1}");
    row(
        &format!("throughput, MB/s ({THROUGHPUT_CONNS} conns, {THROUGHPUT_SECS} s echo)"),
        [f1(tput[0]), f1(tput[1]), f1(tput[2])],
    );
    row(
        "round trip p50, µs (64 B, open connection)",
        [f1(rtts[0].0), f1(rtts[1].0), f1(rtts[2].0)],
    );
    row(
        "round trip p99, µs",
        [f1(rtts[0].1), f1(rtts[1].1), f1(rtts[2].1)],
    );
    row(
        "added p50 / p99, µs",
        [
            "-".into(),
            format!("{:.0}/{:.0}", rtts[1].0 - rtts[0].0, rtts[1].1 - rtts[0].1),
            format!("{:.0}/{:.0}", rtts[2].0 - rtts[0].0, rtts[2].1 - rtts[0].1),
        ],
    );
    row(
        "connect+echo+close p50, µs",
        [f1(crtts[0].0), f1(crtts[1].0), f1(crtts[2].0)],
    );
    row(
        "connect+echo+close p99, µs",
        [f1(crtts[0].1), f1(crtts[1].1), f1(crtts[2].1)],
    );
    println!();
    println!(
        "failover: {LOAD_WORKERS} clients x {} conn/s, backend 3 of 3 killed (SIGKILL) after {} s, {} s more",
        1000 / LOAD_PERIOD.as_millis(),
        LOAD_BEFORE.as_secs(),
        LOAD_AFTER.as_secs()
    );
    println!("{:<46} {:>16} {:>16}", "", "kiln-lb", "haproxy");
    let row2 = |name: &str, a: String, b: String| println!("{name:<46} {a:>16} {b:>16}");
    let each = |i: usize, f: &dyn Fn(&Failover) -> String| {
        fail[i].iter().map(f).collect::<Vec<_>>().join(" ")
    };
    type Column<'a> = &'a dyn Fn(&Failover) -> String;
    let rows: [(&str, Column<'_>); 7] = [
        ("client connections before kill", &|f| {
            f.requests_before.to_string()
        }),
        ("failed client connections before kill", &|f| {
            f.failed_before.to_string()
        }),
        ("client connections after kill", &|f| {
            f.requests_after.to_string()
        }),
        ("failed client connections", &|f| f.failed.to_string()),
        ("dead upstream marked down after, ms", &|f| {
            f.marked_down_ms
                .map_or_else(|| "never".into(), |v| format!("{v:.0}"))
        }),
        ("last connect attempt to dead upstream, ms", &|f| {
            format!("{:.0}", f.last_attempt_ms)
        }),
        ("connect attempts to dead upstream", &|f| {
            f.attempts_after_kill.to_string()
        }),
    ];
    for (name, f) in rows {
        row2(name, each(0, f), each(1, f));
    }
    println!("(one value per round)");
    for (i, name) in ["kiln-lb", "haproxy"].iter().enumerate() {
        for (n, f) in fail[i].iter().enumerate() {
            if let Some(e) = &f.first_error {
                println!("{name} round {}: first client error: {e}", n + 1);
            }
        }
    }
    Ok(())
}

async fn wait_all_up(targets: &[&Target], backends: &[SocketAddr]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    for t in targets {
        while !t.all_up(backends).await {
            if Instant::now() > deadline {
                bail!("{} did not see every backend up", t.name());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}
