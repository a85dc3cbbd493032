//! `kiln lb run` as the helper process the lab starts: pidfile, control socket, `kiln lb
//! status`, `set-upstreams`, SIGHUP re-reading the config file, and SIGTERM draining and exiting.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the helper if the test fails before it exits by itself.
struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A threaded TCP echo server on 127.0.0.1 that answers each message with `tag` + message.
fn backend(tag: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let mut out = tag.as_bytes().to_vec();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn write_config(path: &Path, listen: SocketAddr, upstreams: &[SocketAddr]) {
    let ups: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    std::fs::write(
        path,
        format!(
            "frontends:\n  - name: k8s\n    listen: \"{listen}\"\n    upstreams: [{}]\nhealth:\n  intervalMs: 100\n  timeoutMs: 100\ndrainTimeoutMs: 30000\n",
            ups.join(", ")
        ),
    )
    .unwrap();
}

fn kiln(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env_remove("KILNCONFIG")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(101), "kiln {args:?} panicked");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(sock: &Path) -> Option<serde_json::Value> {
    let (ok, out, _) = kiln(&[
        "lb",
        "status",
        "--control-socket",
        sock.to_str()?,
        "-o",
        "json",
    ]);
    ok.then(|| serde_json::from_str(&out).unwrap())
}

/// Polls `cond` every 20 ms for up to 20 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `msg` on `s` and returns the reply.
fn ask(s: &mut TcpStream, msg: &str) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn upstreams(status: &serde_json::Value) -> Vec<String> {
    status["frontends"][0]["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["address"].as_str().unwrap().to_owned())
        .collect()
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

#[test]
fn lb_helper_reloads_on_sighup_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (config, sock, pidfile) = (
        dir.path().join("lb.yaml"),
        dir.path().join("lb.sock"),
        dir.path().join("lb.pid"),
    );
    let (a, b) = (backend("a:"), backend("b:"));
    let listen = free_port();
    write_config(&config, listen, &[a]);

    let mut helper = Helper(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["-v", "lb", "run", "--config"])
            .arg(&config)
            .arg("--control-socket")
            .arg(&sock)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let pid = helper.0.id();
    eventually("control socket answers", || status_json(&sock).is_some());
    let pid_text = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(pid_text.trim(), pid.to_string());

    // Traffic goes to a; the table shows the frontend and the upstream.
    let mut held = TcpStream::connect(listen).unwrap();
    assert_eq!(ask(&mut held, "hello"), "a:hello");
    let (ok, table, _) = kiln(&["lb", "status", "--control-socket", sock.to_str().unwrap()]);
    assert!(ok);
    assert!(table.starts_with("FRONTEND"), "{table}");
    assert!(
        table.contains("k8s") && table.contains(&a.to_string()),
        "{table}"
    );

    // SIGHUP after rewriting the file: new connections go to b, the held one stays on a.
    write_config(&config, listen, &[b]);
    signal(pid, "-HUP");
    eventually("reloaded upstreams", || {
        upstreams(&status_json(&sock).unwrap()) == [b.to_string()]
    });
    let mut fresh = TcpStream::connect(listen).unwrap();
    assert_eq!(ask(&mut fresh, "x"), "b:x");
    drop(fresh);
    assert_eq!(ask(&mut held, "again"), "a:again");

    // A broken file is refused and the running configuration kept.
    std::fs::write(&config, "frontends: [").unwrap();
    signal(pid, "-HUP");
    let (ok, out, err) = kiln(&[
        "lb",
        "set-upstreams",
        "--control-socket",
        sock.to_str().unwrap(),
        "--frontend",
        "k8s",
        "--upstream",
        &format!("{a},{b}"),
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        upstreams(&status_json(&sock).unwrap()),
        [a.to_string(), b.to_string()]
    );
    let (ok, _, err) = kiln(&[
        "lb",
        "set-upstreams",
        "--control-socket",
        sock.to_str().unwrap(),
        "--frontend",
        "nope",
    ]);
    assert!(
        !ok && err.contains("no frontend is called \"nope\""),
        "{err}"
    );

    // SIGTERM: the listener closes but the held connection is drained, not cut.
    signal(pid, "-TERM");
    eventually("listener closed", || TcpStream::connect(listen).is_err());
    assert_eq!(helper.0.try_wait().unwrap(), None, "exited before draining");
    assert_eq!(ask(&mut held, "last"), "a:last");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = helper.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "kiln lb run did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    assert!(!pidfile.exists(), "pidfile left behind");
    assert!(!sock.exists(), "control socket left behind");
}

#[test]
fn lb_status_without_a_balancer_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let (ok, _, err) = kiln(&["lb", "status", "--control-socket", sock.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("is `kiln lb run` running?"), "{err}");
}

#[test]
fn lb_run_rejects_a_bad_config_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lb.yaml");
    std::fs::write(&config, "frontends: []\n").unwrap();
    let (ok, _, err) = kiln(&["lb", "run", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("no frontends"), "{err}");
}
