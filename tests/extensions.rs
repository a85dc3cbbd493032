//! Extension services and the OAuth2 configuration download on a real lab node (process
//! provisioner, as root: the node in its network namespace, real etcd):
//! - the guide's `hello-world` runs as `ext-hello-world` in its own PID and UTS namespaces on a
//!   read-only root filesystem, with the guide's events; `kiln service ... stop|start|restart`
//!   and `kiln logs` work; `restart: untilSuccess` retries until a run succeeds, `never` runs
//!   once; a broken definition is reported and etcd keeps running;
//! - nodes booted with `kiln.config=` and `kiln.config.oauth.*` run the RFC 8628 device flow
//!   against a small real HTTP server of the test on the cluster network: the approved control
//!   plane fetches its configuration with the token and runs etcd, the denied worker stays in
//!   maintenance mode with the message on its console.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_e2e::{Env, free_cidr};
use kiln_os_api::contract::ConsoleEvent;
use kiln_os_api::wait::{Poll, until_blocking};

/// Destroys the cluster when the test ends, passed or not.
struct Cluster<'a> {
    env: &'a Env,
    name: &'static str,
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        let _ = self.env.kiln(&["cluster", "destroy", "--name", self.name]);
    }
}

fn write(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A container root filesystem using the host's `/usr` (bind-mounted read-only), laid out as
/// a merged-/usr system.
fn rootfs(image: &Path, name: &str) -> PathBuf {
    let root = image.join("usr/local/lib/containers").join(name);
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    for (link, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(target, root.join(link)).unwrap();
    }
    root
}

const USR_MOUNT: &str = "  mounts:
    - source: /usr
      destination: /usr
      type: bind
      options: [rbind, ro]
";

fn image(dir: &Path, state: &Path) -> PathBuf {
    let image = dir.join("image");
    let defs = image.join("usr/local/etc/containers");
    // The guide's example, with the host's /usr mounted so its shell script can run.
    write(
        &defs.join("hello-world.yaml"),
        &format!(
            "name: hello-world
container:
  entrypoint: ./hello
  args:
    - --config
    - config.ini
  environment:
    - GREETING=hello
{USR_MOUNT}depends:
  - service: etcd
  - network:
    - addresses
restart: always
"
        ),
        0o644,
    );
    let root = rootfs(&image, "hello-world");
    write(
        &root.join("hello"),
        "#!/bin/sh
trap 'echo hello-world stopping; exit 0' TERM
echo \"$GREETING from pid $$ on host $(uname -n) with $1 $2: $(cat \"$2\")\"
if touch /probe 2>/dev/null; then echo rootfs writable; else echo rootfs read-only; fi
while true; do sleep 1; done
",
        0o755,
    );
    write(&root.join("config.ini"), "color=blue\n", 0o644);

    // Waits for its ExtensionServiceConfig, then reads the file and environment it gives.
    write(
        &defs.join("configured.yaml"),
        &format!(
            "name: configured
container:
  entrypoint: ./run
  environment:
    - GREETING=default
    - KEEP=kept
{USR_MOUNT}depends:
  - configuration: true
restart: always
"
        ),
        0o644,
    );
    write(
        &rootfs(&image, "configured").join("run"),
        "#!/bin/sh
echo \"configured: $GREETING $KEEP $(cat /etc/app/app.conf)\"
while true; do sleep 1; done
",
        0o755,
    );

    // untilSuccess: fails twice, then succeeds; the runs are counted on a host directory.
    write(
        &defs.join("retry.yaml"),
        &format!(
            "name: retry
container:
  entrypoint: ./run
{USR_MOUNT}    - source: {state}
      destination: /state
      type: bind
      options: [bind, rw]
restart: untilSuccess
",
            state = state.display()
        ),
        0o644,
    );
    let root = rootfs(&image, "retry");
    write(
        &root.join("run"),
        "#!/bin/sh
n=$(cat /state/runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > /state/runs
echo attempt $n
[ $n -ge 3 ]
",
        0o755,
    );

    // never: one failed run, not restarted.
    write(
        &defs.join("once.yaml"),
        &format!("name: once\ncontainer:\n  entrypoint: ./run\n{USR_MOUNT}restart: never\n"),
        0o644,
    );
    let root = rootfs(&image, "once");
    write(
        &root.join("run"),
        "#!/bin/sh\necho ran once\nexit 3\n",
        0o755,
    );

    // A broken definition.
    write(
        &defs.join("broken.yaml"),
        "name: broken\ncontainer:\n  entrypoint: ./run\nrestart: sometimes\n",
        0o644,
    );
    image
}

fn wait_for(env: &Env, args: &[&str], what: &str, pred: impl Fn(&str) -> bool) -> String {
    until_blocking(
        what,
        Poll::every(Duration::from_millis(300), Duration::from_secs(60)),
        || {
            let out = env.kiln(args);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && pred(&text) {
                Ok(text)
            } else {
                Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
            }
        },
    )
    .unwrap_or_else(|t| panic!("{}: last answer: {}", t.what, t.last.unwrap_or_default()))
}

fn state_of(service: &str) -> String {
    service
        .lines()
        .find_map(|l| l.strip_prefix("STATE"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn restarts_of(service: &str) -> u32 {
    service
        .lines()
        .find_map(|l| l.strip_prefix("RESTARTS"))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

#[test]
fn extension_services_run_as_ext_services_in_their_own_namespaces() {
    kiln_test_tiers::skip_unless!(kiln_test_tiers::Tier::Root, kiln_test_tiers::Tier::Etcd);
    let env = Env::new(None);
    let work = tempfile::tempdir().unwrap();
    let runs = work.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let image = image(work.path(), &runs);
    let cidr = free_cidr(&env.home.join(".kiln/clusters"), 91);
    let name = "ext-svc";
    let _cluster = Cluster { env: &env, name };
    env.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "1",
        "--workers",
        "0",
        // Health counts a failed service as unhealthy, and `ext-once` fails on purpose.
        "--wait=false",
        "--extensions",
        &image.display().to_string(),
    ]);

    // The guide's example: ext-hello-world Running, with the guide's events.
    let out = wait_for(
        &env,
        &["service", "ext-hello-world"],
        "ext-hello-world running",
        |o| state_of(o) == "Running",
    );
    for event in [
        "[Waiting]: Waiting for service \"etcd\" to be \"up\"",
        "[Preparing]: Running pre state",
        "[Preparing]: Creating service runner",
        "[Running]: Started task ext-hello-world (PID ",
        "for container ext-hello-world",
    ] {
        assert!(out.contains(event), "event {event:?} missing:\n{out}");
    }
    // Its own PID and UTS namespaces, the read-only root filesystem, args, environment,
    // the file next to the entrypoint.
    let logs = wait_for(
        &env,
        &["logs", "ext-hello-world"],
        "hello-world's output",
        |o| o.contains("rootfs"),
    );
    assert!(
        logs.contains("hello from pid 1 on host hello-world with --config config.ini: color=blue"),
        "{logs}"
    );
    assert!(logs.contains("rootfs read-only"), "{logs}");

    // stop, start, restart.
    env.ok(&["service", "ext-hello-world", "stop"]);
    let out = wait_for(&env, &["service", "ext-hello-world"], "stopped", |o| {
        state_of(o) == "Finished"
    });
    assert!(out.contains("Service stopped"), "{out}");
    assert!(
        env.ok(&["logs", "ext-hello-world"])
            .contains("hello-world stopping"),
        "SIGTERM reached the container's PID 1"
    );
    env.ok(&["service", "ext-hello-world", "start"]);
    wait_for(
        &env,
        &["service", "ext-hello-world"],
        "started again",
        |o| state_of(o) == "Running",
    );
    env.ok(&["service", "ext-hello-world", "restart"]);
    wait_for(&env, &["service", "ext-hello-world"], "restarted", |o| {
        state_of(o) == "Running" && o.matches("Started task ext-hello-world").count() >= 3
    });

    // untilSuccess: two failed runs, then one success, then no more.
    let out = until_blocking(
        "ext-retry finished",
        Poll::every(Duration::from_millis(300), Duration::from_secs(60)),
        || {
            let out = env.ok(&["service", "ext-retry"]);
            if state_of(&out) == "Finished" {
                Ok(out)
            } else {
                Err(format!("{out}\nlogs:\n{}", env.ok(&["logs", "ext-retry"])))
            }
        },
    )
    .unwrap_or_else(|t| panic!("{}: {}", t.what, t.last.unwrap_or_default()));
    assert!(out.contains("Service exited with code 1"), "{out}");
    assert!(out.contains("Service finished successfully"), "{out}");
    assert_eq!(restarts_of(&out), 2, "{out}");
    // never: one failed run, not restarted.
    let out = wait_for(&env, &["service", "ext-once"], "ext-once failed", |o| {
        state_of(o) == "Failed"
    });
    assert!(out.contains("Service exited with code 3"), "{out}");
    // Let a restart that should not happen have its chance (the supervisor's first backoff
    // is 0.5 s), then check both stayed put.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        std::fs::read_to_string(runs.join("runs")).unwrap().trim(),
        "3"
    );
    let out = env.ok(&["service", "ext-once"]);
    assert!(
        state_of(&out) == "Failed" && restarts_of(&out) == 0,
        "{out}"
    );
    assert_eq!(env.ok(&["logs", "ext-once"]).matches("ran once").count(), 1);

    // The broken definition is reported on the console; etcd runs.
    let console = std::fs::read_to_string(
        env.state_dir(name)
            .join(format!("{name}-controlplane-1.log")),
    )
    .unwrap();
    assert!(
        console.contains("broken.yaml is not valid")
            && console.contains("unknown variant `sometimes`"),
        "{console}"
    );
    let services = env.ok(&["services"]);
    assert!(
        services
            .lines()
            .any(|l| l.contains(" etcd ") && l.contains("Running")),
        "{services}"
    );
    assert!(!services.contains("ext-broken"), "{services}");

    // `depends: configuration`: waits until the node's configuration has an
    // ExtensionServiceConfig of its name; applied live, it starts with the file mounted and the
    // environment added (the configuration's value wins over the definition's).
    let out = wait_for(
        &env,
        &["service", "ext-configured"],
        "ext-configured waiting",
        |o| state_of(o) == "Waiting",
    );
    assert!(
        out.contains("Waiting for ExtensionServiceConfig \"configured\""),
        "{out}"
    );
    let node_config = env
        .state_dir(name)
        .join(format!("{name}-controlplane-1.yaml"));
    let with_ext = work.path().join("with-ext.yaml");
    std::fs::write(
        &with_ext,
        format!(
            "{}---
apiVersion: v1alpha1
kind: ExtensionServiceConfig
name: configured
configFiles:
  - content: color=green
    mountPath: /etc/app/app.conf
environment:
  - GREETING=configured
",
            std::fs::read_to_string(&node_config).unwrap()
        ),
    )
    .unwrap();
    let applied = env.ok(&[
        "apply-config",
        "-f",
        &with_ext.display().to_string(),
        "--mode",
        "no-reboot",
    ]);
    assert!(applied.contains("without reboot"), "{applied}");
    wait_for(
        &env,
        &["service", "ext-configured"],
        "ext-configured running",
        |o| state_of(o) == "Running",
    );
    let logs = wait_for(
        &env,
        &["logs", "ext-configured"],
        "ext-configured's output",
        |o| o.contains("configured:"),
    );
    assert!(
        logs.contains("configured: configured kept color=green"),
        "{logs}"
    );
    // A changed document restarts the running service, which reads the new file.
    std::fs::write(
        &with_ext,
        std::fs::read_to_string(&with_ext)
            .unwrap()
            .replace("color=green", "color=red"),
    )
    .unwrap();
    env.ok(&[
        "apply-config",
        "-f",
        &with_ext.display().to_string(),
        "--mode",
        "no-reboot",
    ]);
    wait_for(
        &env,
        &["logs", "ext-configured"],
        "ext-configured restarted with the new file",
        |o| o.contains("configured: configured kept color=red"),
    );
    let out = env.ok(&["service", "ext-configured"]);
    assert!(
        state_of(&out) == "Running" && out.matches("Started task ext-configured").count() >= 2,
        "{out}"
    );
}

// ---- a small RFC 8628 authorization server ----

#[derive(Debug, Default)]
struct Provider {
    /// device code → (host name, polls so far)
    devices: HashMap<String, (String, u32)>,
    /// token → host name
    tokens: HashMap<String, String>,
    /// Requests seen (method and path).
    seen: Vec<String>,
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    form: HashMap<String, String>,
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let form = String::from_utf8_lossy(&body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%3A", ":").replace('+', " ")))
        .collect();
    Some(Request {
        method,
        path,
        headers,
        form,
    })
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Serves the device flow: hosts named `*-controlplane-*` are approved on their third poll,
/// others denied on their second; `/config.yaml` answers the host's configuration from the
/// state directory only with its token.
fn serve(listener: TcpListener, base: String, state: PathBuf, provider: Arc<Mutex<Provider>>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let Some(req) = read_request(&mut stream) else {
            continue;
        };
        let mut p = provider.lock().unwrap();
        p.seen.push(format!("{} {}", req.method, req.path));
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/device/code") => {
                if req.form.get("client_id").map(String::as_str) != Some("kiln-lab") {
                    respond(
                        &mut stream,
                        "401 Unauthorized",
                        r#"{"error":"invalid_client"}"#,
                    );
                    continue;
                }
                let host = req.form.get("hostname").cloned().unwrap_or_default();
                let code = format!("device-{}", p.devices.len());
                p.devices.insert(code.clone(), (host, 0));
                respond(
                    &mut stream,
                    "200 OK",
                    &format!(
                        r#"{{"device_code":"{code}","user_code":"WDJB-MJHT","verification_uri":"{base}/device","verification_uri_complete":"{base}/device?user_code=WDJB-MJHT","expires_in":120,"interval":1}}"#
                    ),
                );
            }
            ("POST", "/token") => {
                let code = req.form.get("device_code").cloned().unwrap_or_default();
                let grant_ok = req.form.get("grant_type").map(String::as_str)
                    == Some("urn:ietf:params:oauth:grant-type:device_code");
                let Some((host, polls)) = p.devices.get_mut(&code).filter(|_| grant_ok) else {
                    respond(
                        &mut stream,
                        "400 Bad Request",
                        r#"{"error":"invalid_grant"}"#,
                    );
                    continue;
                };
                *polls += 1;
                let (host, polls) = (host.clone(), *polls);
                if !host.contains("-controlplane-") && polls >= 2 {
                    respond(
                        &mut stream,
                        "400 Bad Request",
                        r#"{"error":"access_denied","error_description":"the operator said no"}"#,
                    );
                } else if host.contains("-controlplane-") && polls >= 3 {
                    let token = format!("token-for-{host}");
                    p.tokens.insert(token.clone(), host);
                    respond(
                        &mut stream,
                        "200 OK",
                        &format!(r#"{{"access_token":"{token}","token_type":"Bearer"}}"#),
                    );
                } else {
                    respond(
                        &mut stream,
                        "400 Bad Request",
                        r#"{"error":"authorization_pending"}"#,
                    );
                }
            }
            ("GET", "/config.yaml") => {
                let host = req
                    .headers
                    .get("authorization")
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .and_then(|t| p.tokens.get(t))
                    .cloned();
                match host
                    .and_then(|h| std::fs::read_to_string(state.join(format!("{h}.yaml"))).ok())
                {
                    Some(config) => respond(&mut stream, "200 OK", &config),
                    None => respond(&mut stream, "401 Unauthorized", "{}"),
                }
            }
            _ => respond(&mut stream, "404 Not Found", "{}"),
        }
    }
}

fn console(env: &Env, name: &str, node: &str) -> String {
    std::fs::read_to_string(env.state_dir(name).join(format!("{node}.log"))).unwrap_or_default()
}

#[test]
fn nodes_fetch_their_configuration_through_the_oauth2_device_flow() {
    kiln_test_tiers::skip_unless!(kiln_test_tiers::Tier::Root, kiln_test_tiers::Tier::Etcd);
    let env = Env::new(None);
    let cidr = free_cidr(&env.home.join(".kiln/clusters"), 93);
    let gateway = {
        let net = cidr.split('/').next().unwrap();
        let mut octets: Vec<&str> = net.split('.').collect();
        octets[3] = "1";
        octets.join(".")
    };
    let name = "ext-oauth";
    // The provider listens on every host address; nodes reach it at the cluster's gateway.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let base = format!("http://{gateway}:{}", listener.local_addr().unwrap().port());
    let provider = Arc::new(Mutex::new(Provider::default()));
    std::thread::spawn({
        let (base, provider) = (base.clone(), provider.clone());
        let state = env.state_dir(name);
        move || serve(listener, base, state, provider)
    });
    let _cluster = Cluster { env: &env, name };
    env.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "1",
        "--workers",
        "1",
        "--wait=false",
        "--extra-boot-kernel-args",
        &format!(
            "kiln.config={base}/config.yaml kiln.config.oauth.client_id=kiln-lab kiln.config.oauth.scope=openid kiln.config.oauth.extra_variable=hostname"
        ),
    ]);

    // The control plane was approved, fetched its configuration with the token and runs etcd.
    let cp = format!("{name}-controlplane-1");
    let services = wait_for(&env, &["services"], "etcd running", |o| {
        o.lines()
            .any(|l| l.contains(" etcd ") && l.contains("Running"))
    });
    let cp_address = format!("{}2", gateway.trim_end_matches('1'));
    assert!(services.contains(&cp_address), "{services}");
    let log = console(&env, name, &cp);
    for line in [
        "[OAuth] starting the authentication device flow with the following settings:",
        r#"[OAuth]  - client ID: "kiln-lab""#,
        &format!(r#"[OAuth]  - device auth URL: "{base}/device/code""#),
        &format!(r#"[OAuth]  - token URL: "{base}/token""#),
        r#"[OAuth]  - extra variables: ["hostname"]"#,
        &format!("[OAuth] please visit the URL {base}/device and enter the code WDJB-MJHT"),
        "[OAuth] or scan the following QR code:",
        "[OAuth] waiting for the device to be authorized (expires at ",
        "[OAuth] device authorized",
        &format!(r#"fetching machine config from: "{base}/config.yaml""#),
    ] {
        assert!(log.contains(line), "console line {line:?} missing:\n{log}");
    }
    // The QR code itself (half blocks), printed raw on the console.
    assert!(log.contains("▄▄▄▄▄"), "{log}");

    // The worker was denied: maintenance mode, with the reason on its console.
    let worker = format!("{name}-worker-1");
    let event = until_blocking(
        "the worker's denial on its console",
        Poll::every(Duration::from_millis(300), Duration::from_secs(60)),
        || {
            let log = console(&env, name, &worker);
            match ConsoleEvent::last_in(&log) {
                Some(e) if e.stage == "maintenance" && log.contains("authorization was denied") => {
                    Ok((log, e))
                }
                other => Err(format!("{other:?}")),
            }
        },
    )
    .unwrap_or_else(|t| panic!("{}: {:?}", t.what, t.last));
    assert!(
        event
            .0
            .contains("[OAuth] the authorization was denied (access_denied: the operator said no)")
            && event.0.contains("entering maintenance mode"),
        "{}",
        event.0
    );
    let p = provider.lock().unwrap();
    assert!(
        p.seen.iter().filter(|r| *r == "GET /config.yaml").count() == 1,
        "only the approved node fetched a configuration: {:?}",
        p.seen
    );
}
