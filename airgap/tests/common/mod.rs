//! Helpers shared by the air-gap integration tests: the lab DNS and proxy started in-process
//! on loopback, real peers (unbound, dig, curl) as child processes, and a loopback origin.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use kiln_airgap::audit::AuditLog;
use kiln_airgap::dns::{DnsConfig, DnsSockets, LabDns};
use kiln_airgap::proxy::{self, Limits, Proxy};
use kiln_os_api::wait::{Poll, until};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

/// A server running in a task until the sender is dropped or fired.
pub struct Running {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Starts the lab DNS on 127.0.0.1 (UDP and TCP on one free port).
pub async fn start_dns(mut config: DnsConfig, audit: AuditLog) -> anyhow::Result<Running> {
    config.listen = vec!["127.0.0.1:0".parse()?];
    let sockets = DnsSockets::bind(&config.listen).await?;
    let addr = sockets.local_addrs()[0];
    let handler = LabDns::new(&config, audit, Path::new("/etc/resolv.conf"))?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        kiln_airgap::dns::serve(sockets, handler, async {
            let _ = rx.await;
        })
        .await
        .expect("DNS server failed");
    });
    Ok(Running {
        addr,
        stop: Some(tx),
        task,
    })
}

/// Starts a proxy on 127.0.0.1 (TLS first when `tls` is given).
pub async fn start_proxy(
    allow: &[&str],
    audit: AuditLog,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<Running> {
    let allow = kiln_airgap::allow::AllowList(
        allow
            .iter()
            .map(|r| r.parse())
            .collect::<Result<Vec<_>, _>>()?,
    );
    let listener = proxy::bind("127.0.0.1:0".parse()?).await?;
    let addr = listener.local_addr()?;
    let p = Arc::new(Proxy::new(allow, audit, Limits::default()));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        proxy::serve(listener, tls, p, async {
            let _ = rx.await;
        })
        .await;
    });
    Ok(Running {
        addr,
        stop: Some(tx),
        task,
    })
}

/// A loopback origin answering every request with `hello from origin <port>`, one request per
/// connection.
pub async fn start_origin() -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, mut rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = tokio::select! {
                _ = &mut rx => break,
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = format!("hello from origin {}\n", addr.port());
                let out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(out.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    Ok(Running {
        addr,
        stop: Some(tx),
        task,
    })
}

/// Runs a program and returns its stdout (fails on a non-zero exit unless `allow_fail`).
pub async fn run(program: &str, args: &[String], allow_fail: bool) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    if !allow_fail && !out.status.success() {
        bail!(
            "{program} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dig @addr -p port ARGS +time=2 +tries=1`.
pub async fn dig(server: SocketAddr, args: &[&str]) -> anyhow::Result<String> {
    let mut a: Vec<String> = vec![
        format!("@{}", server.ip()),
        "-p".into(),
        server.port().to_string(),
        "+time=2".into(),
        "+tries=1".into(),
    ];
    a.extend(args.iter().map(|s| (*s).to_owned()));
    run("dig", &a, false).await
}

/// The `status:` of a full dig answer.
pub fn dig_status(out: &str) -> Option<String> {
    let rest = out.split("status: ").nth(1)?;
    Some(rest.split(',').next()?.trim().to_owned())
}

/// A free loopback port (for peers that need a port on their command line).
pub fn free_port() -> anyhow::Result<u16> {
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

/// A running unbound serving the static zone `outside.test.` on loopback.
pub struct Unbound {
    pub addr: SocketAddr,
    child: tokio::process::Child,
}

impl Unbound {
    pub async fn start(dir: &Path, extra_local_data: &[String]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut data = vec![
            "www.outside.test. 300 IN A 192.0.2.7".to_owned(),
            "www.outside.test. 300 IN AAAA 2001:db8::7".to_owned(),
        ];
        data.extend(extra_local_data.iter().cloned());
        let local_data: String = data
            .iter()
            .map(|d| format!("  local-data: \"{d}\"\n"))
            .collect();
        let conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-daemonize: no\n  \
             chroot: \"\"\n  username: \"\"\n  directory: \"{dir}\"\n  pidfile: \"\"\n  \
             use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  \
             access-control: 127.0.0.0/8 allow\n  local-zone: \"outside.test.\" static\n  \
             local-zone: \"kiln.bench.\" static\n{local_data}remote-control:\n  control-enable: no\n",
            dir = dir.display()
        );
        let path = dir.join("unbound.conf");
        std::fs::write(&path, conf)?;
        let child = tokio::process::Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting unbound")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        until(
            "unbound answers",
            Poll::every(Duration::from_millis(100), Duration::from_secs(15)),
            || async move {
                let out = dig(addr, &["+short", "www.outside.test", "A"]).await?;
                anyhow::ensure!(out.trim() == "192.0.2.7", "answered {out:?}");
                Ok::<_, anyhow::Error>(())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self { addr, child })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
