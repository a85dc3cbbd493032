//! An air-gapped cluster end to end, as an operator rehearses one: `cluster create
//! --airgapped` starts the lab registry, DNS and egress proxy on the gateway, the nodes have no
//! route beyond the cluster network, `kiln image cache` fills the lab registry with every image
//! of `kiln image list`, a node pulls the installer from it (skopeo, seen in the registry's
//! request log), the lab DNS answers the lab's names over UDP and TCP and refuses others, the
//! audit is clean after the install and turns non-zero once a node asks for something
//! outside, and destroy leaves nothing behind.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;
use std::process::{Command, Output};

use kiln_e2e::{Env, assert_no_leaks, free_cidr, owned};
use kiln_registry_mirror::archive::{ImageFormat, OciLayout, build_image};
use kiln_test_tiers::{Tier, skip_unless};

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} {args:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ip netns exec NS CMD ARGS`.
fn in_node(netns: &str, cmd: &str, args: &[&str]) -> Output {
    let mut all = vec!["netns", "exec", netns, cmd];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Writes an OCI layout named as `kiln image cache --to DIR` names it, for each image but the
/// node image.
fn seed_images(env: &Env, dir: &Path) -> Vec<String> {
    let listed = env.ok(&["image", "list", "-o", "json"]);
    let json = &listed[..listed.rfind(']').unwrap() + 1];
    let images: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    let names: Vec<String> = images
        .iter()
        .map(|i| i["image"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("kiln/installer:v"))
            && names.iter().any(|n| n.starts_with("kiln/node:v")),
        "image list lacks the installer or the node image: {names:?}"
    );
    // The node image is not seeded: `image cache` packs it from the node root filesystem.
    for name in names.iter().filter(|n| !n.starts_with("kiln/node:")) {
        let stem: String = name
            .chars()
            .map(|c| if matches!(c, '/' | ':' | '@') { '_' } else { c })
            .collect();
        let layout = OciLayout::create(&dir.join(stem)).unwrap();
        let tag = name.rsplit_once(':').unwrap().1;
        build_image(
            &layout,
            &[vec![(
                "etc/kiln-image".to_owned(),
                name.as_bytes().to_vec(),
            )]],
            ImageFormat::Oci,
            tag,
        )
        .unwrap();
    }
    names
}

#[test]
fn an_airgapped_cluster_reaches_only_the_lab_and_the_audit_proves_it() {
    skip_unless!(Tier::Root, Tier::Etcd, Tier::Skopeo, Tier::Dns, Tier::Proxy);
    let env = Env::new(None);
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 93);
    let name = "gap-e2e";
    let images_dir = env.home.join("images");
    let images = seed_images(&env, &images_dir);

    let out = env.ok(&[
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        &cidr,
        "--controlplanes",
        "3",
        "--workers",
        "2",
        "--airgapped",
        "--wait-timeout",
        "3m",
    ]);
    for phase in [
        "creating registry mirror",
        "creating lab DNS and egress proxy",
        "bootstrapping cluster",
    ] {
        assert!(out.contains(phase), "phase {phase:?} not printed:\n{out}");
    }
    let dir = env.state_dir(name);
    let o = owned(&dir);
    let result = std::panic::catch_unwind(|| check_airgapped(&env, &dir, &images, &images_dir));
    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&o);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

fn check_airgapped(env: &Env, dir: &Path, images: &[String], images_dir: &Path) {
    let st: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("state.yaml")).unwrap()).unwrap();
    assert_eq!(st["network"]["airgapped"].as_bool(), Some(true));
    let gw = st["network"]["gateway"].as_str().unwrap().to_owned();
    let helpers: Vec<&str> = st["helpers"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    for h in ["lb", "registry-mirror", "dns", "proxy"] {
        assert!(helpers.contains(&h), "helper {h} not recorded: {helpers:?}");
        assert!(
            kiln_provisioner::daemon::running(&dir.join(format!("{h}.pid"))).is_some(),
            "helper {h} is not running by its pid file"
        );
    }
    let node = &st["nodes"][3];
    let netns = node["provider"]["process"]["netns"].as_str().unwrap();
    let node_name = node["name"].as_str().unwrap();
    let node_addr = node["address"].as_str().unwrap();

    // No route beyond the cluster network: no default route, and an outside address is
    // unreachable from the node without a packet leaving it.
    let routes = text(&in_node(netns, "ip", &["route", "show"]));
    assert!(
        !routes.contains("default"),
        "air-gapped node has a default route:\n{routes}"
    );
    let direct = in_node(netns, "curl", &["-sS", "-m", "3", "http://192.0.2.10/"]);
    assert!(!direct.status.success());
    assert!(
        text(&direct).contains("unreachable") || text(&direct).contains("Couldn't connect"),
        "{}",
        text(&direct)
    );

    // The install itself reached nothing outside.
    let audit = env.kiln(&["airgap", "audit", "--state", dir.to_str().unwrap()]);
    assert!(
        audit.status.success(),
        "audit after the install is not clean:\n{}",
        text(&audit)
    );

    // Every listed image into the lab registry; a node pulls the installer from it.
    let registry = format!("{gw}:5000");
    let cached = env.ok(&[
        "image",
        "cache",
        "--from",
        images_dir.to_str().unwrap(),
        "--to",
        &registry,
        "--plain-http",
    ]);
    for i in images {
        assert!(cached.contains(i.as_str()), "{i} not cached:\n{cached}");
    }
    assert!(
        cached
            .lines()
            .any(|l| l.starts_with("kiln/node:") && l.contains("node root filesystem")),
        "the node image was not packed from the node root filesystem:\n{cached}"
    );
    let installer = images
        .iter()
        .find(|i| i.starts_with("kiln/installer:"))
        .unwrap();
    let log = dir.join("registry-mirror.log");
    let pulls = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap()
            .matches(&format!("pull manifest {installer}"))
            .count()
    };
    let before = pulls(&log);
    let inspect = in_node(
        netns,
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{registry}/{installer}"),
        ],
    );
    assert!(inspect.status.success(), "{}", text(&inspect));
    assert!(
        pulls(&log) > before,
        "the registry's request log shows no pull of {installer}"
    );

    // machined itself pulls through the lab mirror: an upgrade of a control-plane node to the
    // listed installer fetches it from the lab registry (its configuration mirrors every
    // registry, `*`, there). The seeded image is not a Kiln release, so the upgrade stops
    // after the pull, before anything on the node changes. After its mirrors the pull falls
    // back to the image's own host, the lab registry's name: machined looks it up with the
    // node's nameservers (the lab DNS), not the host's resolver, which does not know it.
    let cp_addr = st["nodes"][0]["address"].as_str().unwrap();
    let before = pulls(&log);
    let upgrade = env.kiln(&[
        "-n",
        cp_addr,
        "upgrade",
        "--image",
        &format!("registry.kiln.internal:5000/{installer}"),
    ]);
    let said = text(&upgrade);
    eprintln!("upgrade to a seeded (non-release) installer: {said}");
    assert!(!upgrade.status.success(), "{said}");
    assert!(
        pulls(&log) > before,
        "machined did not pull {installer} through the lab mirror:\n{said}"
    );
    assert!(
        // Resolved: the fallback connected and failed in TLS (the lab registry speaks plain
        // HTTP); unresolved, reqwest would say `client error (Connect): dns error`.
        said.contains("https://registry.kiln.internal:5000")
            && said.contains("client error (Connect)")
            && !said.contains("dns error"),
        "the fallback to the registry's name was not resolved by the lab DNS:\n{said}"
    );

    // Lab names over UDP and TCP; outside names refused.
    let dig = |q: &str, tcp: bool| {
        let mut args = vec![
            format!("@{gw}"),
            q.to_owned(),
            "+time=2".into(),
            "+tries=1".into(),
        ];
        if tcp {
            args.push("+tcp".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        text(&in_node(netns, "dig", &args))
    };
    for tcp in [false, true] {
        for (q, want) in [
            (format!("{node_name}.kiln.internal"), node_addr.to_owned()),
            ("gap-e2e.kiln.internal".into(), gw.clone()),
            ("registry.kiln.internal".into(), gw.clone()),
        ] {
            let answer = dig(&q, tcp);
            assert!(
                answer.contains("status: NOERROR") && answer.contains(&want),
                "{q} (tcp {tcp}):\n{answer}"
            );
        }
    }
    // Through the proxy, a lab destination is allowed and the audit stays clean.
    let lab = in_node(
        netns,
        "curl",
        &[
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            &format!("http://{gw}:3128"),
            "http://registry.kiln.internal:5000/v2/",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&lab.stdout),
        "200",
        "{}",
        text(&lab)
    );
    assert!(
        env.kiln(&["airgap", "audit", "--state", dir.to_str().unwrap()])
            .status
            .success()
    );

    // A deliberate outside fetch is denied and turns the audit non-zero.
    let refused = dig("example.com", false);
    assert!(refused.contains("status: REFUSED"), "{refused}");
    let denied = in_node(
        netns,
        "curl",
        &[
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            &format!("http://{gw}:3128"),
            "http://example.com/",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&denied.stdout),
        "403",
        "{}",
        text(&denied)
    );
    let audit = env.kiln(&[
        "airgap",
        "audit",
        "--state",
        dir.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(audit.status.code(), Some(1), "{}", text(&audit));
    let report: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let denied: Vec<&str> = report["summary"]["denied_destinations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert!(
        denied.iter().any(|d| d.starts_with("example.com")),
        "{report}"
    );
    for e in report["events"].as_array().unwrap() {
        if e["decision"] != "allowed" {
            assert!(
                e["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(node_addr)),
                "a denied attempt not from the node: {e}"
            );
        }
    }
}

/// The lines `kiln debug air-gapped` printed so far, read on a thread.
struct DebugServers {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl DebugServers {
    fn start(env: &Env, advertised: &str, patch: &Path) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(&env.bin)
            .args([
                "debug",
                "air-gapped",
                "--advertised-address",
                advertised,
                "--proxy-port",
                "0",
                "--https-port",
                "0",
            ])
            .arg("--patch")
            .arg(patch)
            .env("HOME", &env.home)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err) as Box<dyn std::io::Read + Send>,
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let servers = DebugServers { child, lines };
        servers.wait_for("starting HTTPS server with self-signed cert on :");
        servers
    }

    fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn wait_for(&self, needle: &str) {
        kiln_os_api::wait::until_blocking(
            format!("{needle:?} in the output of kiln debug air-gapped"),
            kiln_os_api::wait::Poll::every(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(60),
            ),
            || {
                if self.log().contains(needle) {
                    Ok(())
                } else {
                    Err(self.log())
                }
            },
        )
        .unwrap();
    }
}

impl Drop for DebugServers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Creates a one-node cluster with `patches`, waits until its control-plane node has stored
/// the debug manifest (or, unless `fetches`, has failed to and says it retries), and returns
/// the node's manifest events.
fn fetch_with(env: &Env, name: &str, cidr: &str, patches: &[String], fetches: bool) -> String {
    let mut args = vec![
        "cluster",
        "create",
        "--name",
        name,
        "--cidr",
        cidr,
        "--controlplanes",
        "1",
        "--workers",
        "0",
    ];
    for p in patches {
        args.extend(["--config-patch", p.as_str()]);
    }
    env.ok(&args);
    let dir = env.state_dir(name);
    let o = owned(&dir);
    let poll = kiln_os_api::wait::Poll::every(
        std::time::Duration::from_millis(500),
        std::time::Duration::from_secs(60),
    );
    let result = std::panic::catch_unwind(|| {
        let st: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("state.yaml")).unwrap())
                .unwrap();
        let addr = st["nodes"][0]["address"].as_str().unwrap().to_owned();
        let manifest_events = || {
            text(&env.kiln(&["-n", &addr, "events"]))
                .lines()
                .filter(|l| l.contains("extraManifests"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        if !fetches {
            return kiln_os_api::wait::until_blocking(
                "a failed fetch of the debug manifest",
                poll,
                || {
                    let events = manifest_events();
                    if events.contains("failed") && events.contains("retrying") {
                        Ok(events)
                    } else {
                        Err(events)
                    }
                },
            )
            .unwrap();
        }
        let manifest =
            kiln_os_api::wait::until_blocking("the debug manifest on the node", poll, || {
                let out = env.kiln(&["-n", &addr, "read", "/var/lib/kiln/manifests/00-debug.yaml"]);
                if out.status.success() {
                    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
                } else {
                    Err(format!("{}\nevents:\n{}", text(&out), manifest_events()))
                }
            })
            .unwrap();
        assert!(
            manifest.contains("name: kiln-air-gapped-debug"),
            "stored manifest:\n{manifest}"
        );
        manifest_events()
    });
    env.ok(&["cluster", "destroy", "--name", name]);
    assert_no_leaks(&o);
    result.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

#[test]
fn a_node_with_the_debug_air_gapped_patch_trusts_the_certificate_and_fetches_the_manifest() {
    skip_unless!(Tier::Root, Tier::Etcd);
    let env = Env::new(None);
    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 97);
    let gw = cidr.replace(".0/24", ".1");
    let patch = env.home.join("air-gapped-patch.yaml");
    let servers = DebugServers::start(&env, &gw, &patch);
    let patch_arg = format!("@{}", patch.display());

    // The guide's patch as written: the HTTPS server is on the cluster network, which
    // no_proxy excludes, so the node fetches it directly, trusting the appended certificate.
    let one = std::slice::from_ref(&patch_arg);
    let events = fetch_with(&env, "gapdbg-direct", &cidr, one, true);
    servers.wait_for("GET /debug.yaml");
    assert!(events.contains("directly"), "events:\n{events}");
    assert!(!servers.log().contains("CONNECT"), "{}", servers.log());

    // With the cluster network taken out of no_proxy, the same fetch goes through the proxy:
    // a CONNECT to the HTTPS server, and the certificate still checks inside the tunnel.
    let through = "{machine: {env: {no_proxy: localhost}}}".to_owned();
    let two = [patch_arg.clone(), through];
    let events = fetch_with(&env, "gapdbg-proxy", &cidr, &two, true);
    let https_port = servers
        .log()
        .lines()
        .find_map(|l| {
            l.split("starting HTTPS server with self-signed cert on :")
                .nth(1)
        })
        .unwrap()
        .trim()
        .to_owned();
    servers.wait_for(&format!("CONNECT {gw}:{https_port}"));
    assert!(
        events.contains("through the proxy http://"),
        "events:\n{events}"
    );

    // Without the appended certificate the server is not trusted: the node says why and
    // retries, and the server sees the handshake fail (the guide's expected error line).
    let untrusted = [
        patch_arg,
        "[{op: remove, path: /machine/files/0}]".to_owned(),
    ];
    let events = fetch_with(&env, "gapdbg-untrusted", &cidr, &untrusted, false);
    assert!(events.contains("certificate"), "events:\n{events}");
    servers.wait_for("http: TLS handshake error from");
    eprintln!("{events}\n{}", servers.log());
}
