//! `kiln debug air-gapped` and `kiln airgap ...` as a user runs them: the patch validates on a
//! generated config, curl fetches the manifest through the proxy with the patch's certificate,
//! the guide's log lines appear; the DNS helper writes its pid and log and the audit command
//! exits non-zero once something was refused.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use kiln_os_api::wait::{Poll, until_blocking};
use kiln_test_tiers::Tier;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of the child's stdout, read on a thread.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Returns the first line containing `needle`, from those seen so far or (waiting up to 20 s)
/// from the next ones.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    needle: &str,
    seen: &mut Vec<String>,
) -> anyhow::Result<String> {
    if let Some(line) = seen.iter().find(|l| l.contains(needle)) {
        return Ok(line.clone());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return Ok(line);
                }
            }
            Err(_) => bail!("no line with {needle:?} within 20 s; saw {seen:#?}"),
        }
    }
}

fn port_of(line: &str) -> anyhow::Result<u16> {
    line.rsplit(':')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("no port in {line:?}"))
}

#[test]
fn debug_air_gapped_patch_validates_and_the_servers_answer_through_the_proxy() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let patch = dir.path().join("air-gapped-patch.yaml");
    let mut child = kiln()
        .args(["debug", "air-gapped", "--advertised-address", "127.0.0.1"])
        .args([
            "--bind-address",
            "127.0.0.1",
            "--proxy-port",
            "0",
            "--https-port",
            "0",
        ])
        .arg("--patch")
        .arg(&patch)
        .stdout(Stdio::piped())
        .spawn()?;
    let rx = lines(&mut child);
    let _guard = Guard(child);
    let mut seen = Vec::new();
    wait_line(&rx, "writing config patch to", &mut seen)?;
    let proxy_port = port_of(&wait_line(&rx, "starting HTTP proxy on :", &mut seen)?)?;
    let https_port = port_of(&wait_line(
        &rx,
        "starting HTTPS server with self-signed cert on :",
        &mut seen,
    )?)?;

    // The patch on a generated config passes `kiln validate` for process nodes.
    let out = kiln()
        .args(["gen", "config", "airgap-test", "https://127.0.0.1:6443"])
        .arg("--kilnconfig")
        .arg(dir.path().join("kilnconfig"))
        .arg("--output")
        .arg(dir.path())
        .arg("--config-patch")
        .arg(format!("@{}", patch.display()))
        .output()?;
    ensure!(
        out.status.success(),
        "gen config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["controlplane.yaml", "worker.yaml"] {
        let out = kiln()
            .args(["validate", "--mode", "process", "--config"])
            .arg(dir.path().join(file))
            .output()?;
        ensure!(
            out.status.success(),
            "validate {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join(file))?;
        ensure!(
            text.contains("/etc/ssl/certs/ca-certificates"),
            "{file} lacks the certificate"
        );
        ensure!(
            text.contains(&format!("http://127.0.0.1:{proxy_port}")),
            "{file} lacks the proxy environment"
        );
        ensure!(
            text.contains(&format!(
                "extraManifests:\n  - https://127.0.0.1:{https_port}/debug.yaml"
            )),
            "{file} lacks the extra manifest:\n{text}"
        );
    }

    if !kiln_test_tiers::check("airgap_cli::debug_air_gapped curl", &[Tier::Proxy]) {
        return Ok(());
    }
    // The certificate from the patch lets curl fetch the manifest through the proxy.
    let doc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&patch)?)?;
    let cert = doc["machine"]["files"][0]["content"]
        .as_str()
        .context("patch has no certificate")?;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert)?;
    let url = format!("https://127.0.0.1:{https_port}/debug.yaml");
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "-x",
            &proxy,
            "--cacert",
        ])
        .arg(&ca)
        .arg(&url)
        .output()?;
    let body = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && body.contains("kind: ConfigMap"),
        "curl: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_line(&rx, &format!("CONNECT 127.0.0.1:{https_port}"), &mut seen)?;
    wait_line(&rx, "GET /debug.yaml", &mut seen)?;
    // Without the certificate the handshake fails, as on a node before the patch applies.
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--noproxy",
            "",
            "-x",
            &proxy,
            &url,
        ])
        .output()?;
    ensure!(
        !out.status.success(),
        "curl trusted a self-signed certificate"
    );
    wait_line(&rx, "http: TLS handshake error from 127.0.0.1:", &mut seen)?;
    Ok(())
}

fn dig_short(port: u16, name: &str) -> anyhow::Result<String> {
    let out = Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port.to_string(),
            "+time=1",
            "+tries=1",
            "+short",
            name,
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
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

fn audit_status(state: &Path) -> anyhow::Result<(bool, String)> {
    let out = kiln()
        .args(["airgap", "audit", "-o", "json", "--state"])
        .arg(state)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
fn dns_helper_writes_pid_and_log_and_the_audit_fails_after_a_refusal() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Dns);
    let state = tempfile::tempdir()?;
    let (clean, json) = audit_status(state.path())?;
    ensure!(clean, "an empty audit is clean: {json}");

    let port = free_port()?;
    let mut names =
        kiln_airgap::lab::ClusterNames::new("lab", "127.0.0.1".parse()?, "127.0.0.0/8".parse()?);
    names
        .nodes
        .push(("lab-worker-1".into(), "10.5.0.5".parse()?));
    let mut config = names.dns_config(true);
    config.listen = vec![format!("127.0.0.1:{port}").parse()?];
    let args = kiln_airgap::lab::helper_args(
        state.path(),
        kiln_airgap::lab::DNS_HELPER,
        &config.to_yaml(),
    )?;
    let child = kiln()
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut guard = Guard(child);
    until_blocking(
        "the DNS helper answers",
        Poll::every(Duration::from_millis(100), Duration::from_secs(20)),
        || {
            let got = dig_short(port, "lab-worker-1.kiln.internal").map_err(|e| e.to_string())?;
            if got == "10.5.0.5" {
                Ok(())
            } else {
                Err(format!("answered {got:?}"))
            }
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Pid and start time, like every lab helper's pid file.
    let pid: u32 = std::fs::read_to_string(state.path().join("dns.pid"))?
        .split_whitespace()
        .next()
        .context("dns.pid is empty")?
        .parse()?;
    ensure!(
        pid == guard.0.id(),
        "dns.pid holds {pid}, not the helper's {}",
        guard.0.id()
    );
    ensure!(
        dig_short(port, "example.com")?.is_empty(),
        "outside names get no address"
    );
    let (clean, json) = audit_status(state.path())?;
    ensure!(!clean, "a refused name makes the audit fail");
    ensure!(
        json.contains("\"example.com.\"") && json.contains("\"denied\""),
        "{json}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = guard.0.wait()?;
    ensure!(
        status.success(),
        "the helper exits cleanly on SIGTERM: {status}"
    );
    ensure!(
        !state.path().join("dns.pid").exists(),
        "dns.pid is removed on exit"
    );
    let log = std::fs::read_to_string(state.path().join("dns.log"))?;
    ensure!(
        log.contains("lab DNS listening") && log.contains("lab DNS stopped"),
        "{log}"
    );
    Ok(())
}
