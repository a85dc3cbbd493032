//! The process launcher's watchdog, end to end: a new release that neither confirms nor exits
//! (its "machined" hangs) is reset by the launcher once the watchdog runs out, and the next
//! power-on falls back to the old slot, which reports the failed attempt with the reason.
//! (The upgrade scenarios cover releases that confirm, exit or fail to pull.)

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::{Env, free_cidr};
use kiln_test_tiers::{Tier, skip_unless};

/// Kills the registry when the test ends, however it ends.
struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn registry(env: &Env, root: &Path) -> (Registry, String) {
    let ready = root.join("addr");
    let child = Command::new(&env.bin)
        .args(["registry", "serve", "--addr", "0.0.0.0:0", "--root"])
        .arg(root.join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let registry = Registry(child);
    let start = Instant::now();
    loop {
        if let Ok(url) = std::fs::read_to_string(&ready) {
            let port = url.trim().rsplit(':').next().unwrap().to_owned();
            return (registry, port);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "kiln registry serve did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_new_release_that_hangs_is_reset_by_the_launcher_and_the_node_falls_back() {
    skip_unless!(Tier::Root, Tier::Etcd);
    let env = Env::new(None);
    let work = env.home.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (_registry, port) = registry(&env, &work);
    let push = format!("127.0.0.1:{port}");

    // N-1 is this workspace's machined; the hanging release's "machined" sleeps.
    let hang = work.join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\nexec sleep 3600\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for (version, init) in [("1.0.0-old", None), ("1.0.0-hang", Some(&hang))] {
        let out = work.join(version).display().to_string();
        let mut args = vec![
            "image",
            "installer",
            "--image-version",
            version,
            "--push",
            push.as_str(),
            "--plain-http",
            "--out",
            out.as_str(),
        ];
        let init = init.map(|p| p.display().to_string());
        if let Some(init) = &init {
            args.extend(["--init", init.as_str()]);
        }
        env.ok(&args);
    }

    let base = env.home.join(".kiln/clusters");
    let cidr = free_cidr(&base, 91);
    let gateway = cidr.replace(".0/24", ".1");
    let patch = format!(
        r#"{{"machine":{{"registries":{{"mirrors":{{"releases.lab":{{"endpoints":["http://{gateway}:{port}"]}}}}}}}}}}"#
    );
    let install = format!("{push}/kiln/installer:1.0.0-old");
    let out = env.kiln_env(
        &[
            "cluster",
            "create",
            "--name",
            "watchdog",
            "--cidr",
            &cidr,
            "--controlplanes",
            "1",
            "--workers",
            "1",
            "--install-image",
            &install,
            "--install-plain-http",
            "--config-patch",
            &patch,
            "--wait-timeout",
            "3m",
        ],
        // The launchers inherit it: 20 s instead of four minutes.
        &[(kiln_os_api::slots::WATCHDOG_ENV, "20")],
    );
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(out.status.success(), "create failed:\n{}", text(&out));
    let destroy = || {
        env.ok(&["cluster", "destroy", "--name", "watchdog"]);
    };

    let worker = cidr.replace(".0/24", ".3");
    let started = Instant::now();
    let upgrade = env.kiln(&[
        "-n",
        &worker,
        "upgrade",
        "--image",
        "releases.lab/kiln/installer:1.0.0-hang",
        "--preserve",
        "--timeout",
        "3m",
    ]);
    let took = started.elapsed();
    let said = text(&upgrade);
    let version = env.kiln(&["-n", &worker, "version"]);
    destroy();
    assert!(
        !upgrade.status.success(),
        "an upgrade to a release that hangs succeeded:\n{said}"
    );
    assert!(
        said.contains("launcher's watchdog reset it") && said.contains("booted slot A again"),
        "the failed attempt does not say the watchdog reset it:\n{said}"
    );
    assert!(
        took >= Duration::from_secs(20) && took < Duration::from_secs(150),
        "the fallback took {took:?} with a 20 s watchdog:\n{said}"
    );
    let version = text(&version);
    assert!(
        version.contains("1.0.0-old"),
        "the worker does not run the old release again:\n{version}"
    );
}
