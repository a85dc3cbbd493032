//! DORA exchanges per second and latency of `kiln dhcpd` and Kea (`kea-dhcp4`), both
//! single-threaded, with the same pool and persistent lease files, driven by Kea's own load
//! generator `perfdhcp` acting as a relay on loopback. Prints one table.
//!
//! ```text
//! sudo cargo run --release -p kiln-dhcpd --example dhcpd-bench -- [SECONDS] [CLIENTS] [RATES] [ROUNDS]
//! ```
//!
//! SECONDS per run (default 10), CLIENTS distinct MACs (default 50000; the pool has 65536
//! addresses), RATES the comma-separated offered rates in DORA/s (default 2000,50000: one
//! both keep up with, for latency, and one above what either does, for throughput).
//! ROUNDS 2 (the default) runs each rate as kiln, Kea, Kea, kiln; 1 as kiln, Kea. Needs
//! root (a network namespace of its own, whose loopback also gets the relay address
//! 127.0.0.2 that perfdhcp sends from), `kea-dhcp4` (kea-dhcp4-server) and `perfdhcp`
//! (kea-admin).
//!
//! Latency is per exchange (DISCOVER→OFFER plus REQUEST→ACK) from perfdhcp's timers of
//! every successful exchange (`-x t`); p99 is taken over them.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a benchmark program fails loudly

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kiln_dhcpd::{Config, Counters, Handler, LeaseTable, Pool, server};

const SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const RELAY: &str = "127.0.0.2";
const POOL_START: &str = "127.1.0.0";
const POOL_END: &str = "127.1.255.255";

#[derive(Debug, Default)]
struct Result {
    /// Completed DORA exchanges per second, as perfdhcp reports.
    rate: f64,
    /// DISCOVERs sent.
    sent: u64,
    /// ACKs received.
    acked: u64,
    /// Median and 99th percentile of DISCOVER→OFFER, then of REQUEST→ACK, in ms.
    offer_p50: f64,
    offer_p99: f64,
    ack_p50: f64,
    ack_p99: f64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: u32 = args.first().map_or(Ok(10), |s| s.parse())?;
    let clients: u32 = args.get(1).map_or(Ok(50_000), |s| s.parse())?;
    let rates: Vec<u32> = args
        .get(2)
        .map_or("2000,50000", String::as_str)
        .split(',')
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()?;
    let rounds: usize = args.get(3).map_or(Ok(2), |s| s.parse())?;
    if !(1..=2).contains(&rounds) {
        bail!("ROUNDS is 1 (kiln, then Kea) or 2 (kiln, Kea, Kea, kiln)");
    }
    for tool in ["kea-dhcp4", "perfdhcp"] {
        Command::new(tool)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("{tool} is not installed (scripts/install-deps installs kea-dhcp4-server and kea-admin)"))?;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark binds port 67: run it as root");
    }
    let kea_version = Command::new("kea-dhcp4").arg("-v").output()?.stdout;
    println!(
        "DHCPv4 DORA benchmark: perfdhcp as a relay on loopback, {clients} clients, pool of 65536, {seconds} s per run, one thread per server, leases persisted; Kea {}",
        String::from_utf8_lossy(&kea_version).trim()
    );
    let ns = Netns::new()?;
    let mut rows = Vec::new();
    for &rate in &rates {
        // Both orders, so that neither server always runs first.
        for name in ["kiln dhcpd", "kea-dhcp4", "kea-dhcp4", "kiln dhcpd"]
            .into_iter()
            .take(2 * rounds)
        {
            let dir = tempfile::tempdir()?;
            let result = if name == "kiln dhcpd" {
                let stop = start_kiln(&ns, dir.path())?;
                let r = perfdhcp(&ns, rate, clients, seconds);
                stop();
                r?
            } else {
                let mut kea = start_kea(&ns, dir.path())?;
                let r = perfdhcp(&ns, rate, clients, seconds);
                let _ = kea.kill();
                let _ = kea.wait();
                r?
            };
            rows.push((rate, name, result));
        }
    }
    println!();
    println!(
        "{:>8}  {:<11} {:>10} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "OFFERED",
        "SERVER",
        "DORA/s",
        "DISCOVERS",
        "ACKS",
        "D-O p50",
        "D-O p99",
        "R-A p50",
        "R-A p99"
    );
    for (rate, name, r) in &rows {
        println!(
            "{:>8}  {:<11} {:>10.1} {:>9} {:>9} {:>8.3}ms {:>8.3}ms {:>8.3}ms {:>8.3}ms",
            rate, name, r.rate, r.sent, r.acked, r.offer_p50, r.offer_p99, r.ack_p50, r.ack_p99
        );
    }
    Ok(())
}

/// Starts the kiln server on 127.0.0.1:67 in a thread of its own with a one-thread runtime;
/// returns a function that stops it.
fn start_kiln(ns: &Netns, dir: &Path) -> anyhow::Result<impl FnOnce()> {
    let mut config = Config::new(SERVER, "127.0.0.0/8".parse()?);
    config.router = Some(SERVER);
    config.dns_servers = vec![SERVER];
    config.pool = Some(Pool {
        start: POOL_START.parse()?,
        end: POOL_END.parse()?,
    });
    config.validate()?;
    let table = LeaseTable::open(dir, server::unix_now())?;
    // The socket belongs to the namespace of the thread that opens it.
    let path = ns.path();
    let socket = std::thread::spawn(move || -> anyhow::Result<std::net::UdpSocket> {
        nix::sched::setns(
            std::fs::File::open(path)?,
            nix::sched::CloneFlags::CLONE_NEWNET,
        )?;
        Ok(kiln_dhcpd::daemon::bind_udp(
            SocketAddrV4::new(SERVER, 67),
            None,
        )?)
    })
    .join()
    .unwrap()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
            server::serve(
                socket,
                Handler::new(config, table, 67),
                Arc::new(Counters::default()),
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
    });
    Ok(move || {
        let _ = stop.send(());
        let _ = thread.join();
    })
}

/// Starts `kea-dhcp4` on 127.0.0.1 with the same pool, one thread, memfile leases persisted.
fn start_kea(ns: &Netns, dir: &Path) -> anyhow::Result<std::process::Child> {
    let config = serde_json::json!({
        "Dhcp4": {
            "interfaces-config": { "interfaces": ["lo/127.0.0.1"], "dhcp-socket-type": "udp" },
            "lease-database": {
                "type": "memfile", "persist": true, "lfc-interval": 0,
                "name": dir.join("kea-leases4.csv"),
            },
            "multi-threading": { "enable-multi-threading": false },
            "valid-lifetime": 3600, "renew-timer": 1800, "rebind-timer": 3150,
            "subnet4": [{
                "id": 1,
                "subnet": "127.0.0.0/8",
                "pools": [{ "pool": format!("{POOL_START} - {POOL_END}") }],
                "option-data": [
                    { "name": "routers", "data": "127.0.0.1" },
                    { "name": "domain-name-servers", "data": "127.0.0.1" },
                ],
            }],
            "loggers": [{
                "name": "kea-dhcp4", "severity": "WARN",
                "output_options": [{ "output": dir.join("kea.log") }],
            }],
        }
    });
    let path = dir.join("kea-dhcp4.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let child = ns
        .command("kea-dhcp4")
        .arg("-c")
        .arg(&path)
        .env("KEA_PIDFILE_DIR", dir)
        .env("KEA_LOCKFILE_DIR", dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting kea-dhcp4")?;
    // Kea is up once it answers: a short perfdhcp run that must see an exchange.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if perfdhcp_once(ns).unwrap_or(false) {
            return Ok(child);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "kea-dhcp4 did not answer within 15 s; see {}",
                dir.join("kea.log").display()
            );
        }
    }
}

fn perfdhcp_once(ns: &Netns) -> anyhow::Result<bool> {
    let out = ns
        .command("perfdhcp")
        .args([
            "-4",
            "-l",
            RELAY,
            "-n",
            "1",
            "-r",
            "1",
            "-W",
            "0",
            "-u",
            "127.0.0.1",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(field(&text, "received packets:").is_some_and(|v| v > 0.0))
}

fn perfdhcp(ns: &Netns, rate: u32, clients: u32, seconds: u32) -> anyhow::Result<Result> {
    let out = ns
        .command("perfdhcp")
        .args([
            "-4",
            "-l",
            RELAY,
            "-r",
            &rate.to_string(),
            "-R",
            &clients.to_string(),
            "-p",
            &seconds.to_string(),
            "-x",
            "t",
            "127.0.0.1",
        ])
        .stdin(Stdio::null())
        .output()
        .context("running perfdhcp")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if std::env::var_os("BENCH_DEBUG").is_some() {
        eprintln!("{text}");
    }
    parse(&text).with_context(|| format!("unexpected perfdhcp output:\n{text}"))
}

/// The benchmark's network namespace: loopback up with 127.0.0.1 and 127.0.0.2.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Self> {
        let ns = Netns(format!("kdhcp-bench-{}", std::process::id()));
        ip(&["netns", "add", &ns.0])?;
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns.0, "addr", "add", "127.0.0.2/8", "dev", "lo"])?;
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn field(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The text of the section that starts with the header line containing `title`.
fn section<'a>(text: &'a str, title: &str) -> Option<&'a str> {
    let start = text.find(title)?;
    let rest = &text[start..];
    let body = rest.find('\n').map_or("", |nl| &rest[nl + 1..]);
    Some(body.find("***").map_or(body, |end| &body[..end]))
}

/// Median and 99th percentile (ms) of the `sent / received: A / B` timer lines of a section.
fn percentiles(text: &str, title: &str) -> anyhow::Result<(f64, f64)> {
    let body = section(text, title).with_context(|| format!("no {title} section"))?;
    let mut delays: Vec<f64> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("sent / received:"))
        .filter_map(|r| {
            let (a, b) = r.split_once('/')?;
            Some((b.trim().parse::<f64>().ok()? - a.trim().parse::<f64>().ok()?) * 1000.0)
        })
        .collect();
    if delays.is_empty() {
        bail!("no timers in the {title} section");
    }
    delays.sort_by(f64::total_cmp);
    let at = |q: f64| delays[((delays.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

fn parse(text: &str) -> anyhow::Result<Result> {
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Rate:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no Rate line")?;
    let discover =
        section(text, "Statistics for: DISCOVER-OFFER").context("no DISCOVER-OFFER statistics")?;
    let request =
        section(text, "Statistics for: REQUEST-ACK").context("no REQUEST-ACK statistics")?;
    let (offer_p50, offer_p99) = percentiles(text, "Timestamps for packets: DISCOVER-OFFER")?;
    let (ack_p50, ack_p99) = percentiles(text, "Timestamps for packets: REQUEST-ACK")?;
    Ok(Result {
        rate,
        sent: field(discover, "sent packets:").context("no sent packets")? as u64,
        acked: field(request, "received packets:").context("no received packets")? as u64,
        offer_p50,
        offer_p99,
        ack_p50,
        ack_p99,
    })
}
