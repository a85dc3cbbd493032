//! `kiln registry`: the hidden launcher starts the registry in the background with a pidfile,
//! an address file and a log in the state directory; `push-archive` and `export` move an
//! image in and out with the same digest; the log records each pull.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use kiln_registry_mirror::archive::{self, ImageFormat, OciLayout};

fn kiln(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "kiln {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn running(pid: &str) -> bool {
    // Gone, or a zombie waiting for a parent that does not reap, both count as stopped.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

struct Stop(String);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0]).status();
    }
}

#[test]
fn launch_push_archive_export() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = kiln(&[
        "registry",
        "launch",
        "--state-dir",
        &state.display().to_string(),
        "--addr",
        &addr,
    ])?;
    ensure!(out.contains("registry mirror started"), "{out}");
    let pid = std::fs::read_to_string(state.join("registry-mirror.pid"))?
        .trim()
        .to_owned();
    let stop = Stop(pid.clone());
    ensure!(running(&pid), "registry {pid} is not running");
    assert_eq!(
        std::fs::read_to_string(state.join("registry-mirror.addr"))?.trim(),
        format!("http://{addr}")
    );

    let layout_dir = tmp.path().join("layout");
    let layout = OciLayout::create(&layout_dir)?;
    let layers = vec![
        vec![("etc/motd".to_owned(), b"kiln\n".to_vec())],
        vec![("bin/tool".to_owned(), vec![7u8; 4096])],
    ];
    let built = archive::build_image(&layout, &layers, ImageFormat::Oci, "v1")?.digest;

    let pushed = kiln(&[
        "registry",
        "push-archive",
        &layout_dir.display().to_string(),
        &format!("{addr}/kiln/tools:v1"),
        "--plain-http",
    ])?;
    assert_eq!(pushed.trim(), format!("{addr}/kiln/tools@{built}"));
    let tar = tmp.path().join("tools.tar");
    let exported = kiln(&[
        "registry",
        "export",
        &format!("{addr}/kiln/tools:v1"),
        &tar.display().to_string(),
        "--plain-http",
    ])?;
    assert!(exported.trim().ends_with(&built), "{exported}");
    let again = kiln(&[
        "registry",
        "push-archive",
        &tar.display().to_string(),
        &format!("{addr}/kiln/copy:v1"),
        "--plain-http",
    ])?;
    assert_eq!(again.trim(), format!("{addr}/kiln/copy@{built}"));

    let log = std::fs::read_to_string(state.join("registry-mirror.log"))?;
    ensure!(
        log.contains("pull manifest kiln/tools:v1 local"),
        "request log lacks the pull:\n{log}"
    );

    drop(stop);
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(&pid) {
        ensure!(
            Instant::now() < deadline,
            "registry {pid} did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(state.join("registry-mirror.log")).context("log")?;
    ensure!(log.contains("registry stopped"), "{log}");
    ensure!(Path::new(&state.join("registry")).is_dir());
    Ok(())
}
