//! The scenario suite as tests: every built-in scenario on every provisioner (ignored, with the
//! reason printed, where the provisioner is unavailable), plus checks of the engine itself: a
//! failing scenario reports its step, reason and crash dump and leaves no cluster behind, and
//! the JUnit XML parses with a standard parser.
//!
//! Scenarios run one at a time unless `--test-threads` says otherwise. Crash dumps go to
//! `$KILN_SCENARIO_ARTIFACTS` (default `target/scenario-artifacts`).

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::PathBuf;
use std::time::Duration;

use kiln_scenarios::runner::{self, Outcome, Report, RunOptions};
use kiln_scenarios::{Scenario, catalog};
use kiln_test_tiers::Tier;
use libtest_mimic::{Arguments, Failed, Trial};

const PROVISIONERS: [&str; 3] = ["process", "qemu", "docker"];

/// The qemu scenarios every run includes (the others are ignored unless asked for: each boots
/// QEMU nodes for minutes under TCG, and CI has a time budget): a reboot, the A/B slots of the
/// launcher's boot disk both ways (a release confirmed then rolled back; one that panics and
/// falls back), and the guides' procedures (kubeadm migration, etcd maintenance). 1–2 minutes
/// each here.
const QEMU_IN_CI: &[&str] = &[
    "node-reboot",
    "rollback",
    "upgrade-boot-failure",
    "kubeadm-migration",
    "etcd-maintenance",
];

fn artifacts() -> PathBuf {
    std::env::var_os("KILN_SCENARIO_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/scenario-artifacts")
        })
}

/// Options for one trial: a free /24 from `10.120.0.0` on is picked when it runs, so a host
/// bridge on a fixed range never collides. Clusters are named `$KILN_SCENARIO_PREFIX<scenario>`.
fn options(state: &std::path::Path, provisioner: &str) -> RunOptions {
    let mut o = RunOptions::new(provisioner, state.to_owned(), artifacts());
    o.name_prefix = std::env::var("KILN_SCENARIO_PREFIX").unwrap_or_default();
    o
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn run(scenario: &Scenario, opts: &RunOptions) -> Report {
    runtime().block_on(runner::run(scenario, opts))
}

fn set_kiln_bin(bin: &std::path::Path) {
    // Child processes get the variable through their environment; this process reads it only
    // through kiln_provisioner::daemon::kiln_binary.
    #[allow(unsafe_code)]
    // SAFETY: called at the start of main, before the harness starts any thread.
    unsafe {
        std::env::set_var("KILN_BIN", bin);
        // The qemu trials' image store (built by the first qemu trial), which the runner reads.
        std::env::set_var("KILN_IMAGE_STORE", scenario_images());
    }
}

/// The dockerd of the `docker::` trials: started by the first of them on the socket that
/// `DOCKER_HOST` names (set at the start of main), with its own data and exec roots, its own
/// bridge and no iptables chains (so it neither needs nor disturbs another engine); stopped
/// when the harness ends.
struct ScenarioDockerd {
    dir: PathBuf,
    engine: std::sync::Mutex<Option<kiln_test_tiers::dockerd::TestEngine>>,
}

impl ScenarioDockerd {
    fn socket(&self) -> PathBuf {
        self.dir.join("d.sock")
    }

    fn ensure(&self) -> Result<(), Failed> {
        let mut engine = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if engine.is_none() {
            *engine = Some(
                kiln_test_tiers::dockerd::TestEngine::start(
                    &self.dir,
                    kiln_test_tiers::dockerd::Firewall::Untouched,
                    &[],
                )
                .map_err(Failed::from)?,
            );
        }
        Ok(())
    }

    fn stop(&self) {
        drop(self.engine.lock().unwrap_or_else(|e| e.into_inner()).take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static DOCKERD: std::sync::OnceLock<ScenarioDockerd> = std::sync::OnceLock::new();

/// The image store the qemu trials boot from: built once per run with `kiln image build`
/// (content-addressed: an unchanged image is not rebuilt).
fn scenario_images() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/scenario-images")
}

fn qemu_image_store() -> Result<PathBuf, String> {
    static STORE: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    STORE
        .get_or_init(|| {
            let store = scenario_images();
            let kiln = locate_kiln()?;
            let out = std::process::Command::new(&kiln)
                .args(["image", "build", "--no-installer", "--out"])
                .arg(&store)
                .arg("--init")
                .arg(kiln.with_file_name("machined"))
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "kiln image build: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(store)
        })
        .clone()
}

fn scenario_trial(scenario: Scenario, provisioner: &'static str) -> Trial {
    let name = format!("{provisioner}::{}", scenario.name);
    Trial::test(name.clone(), move || {
        if provisioner == "docker" {
            if !kiln_test_tiers::check(&name, &[Tier::Root, Tier::Docker, Tier::Etcd]) {
                return Ok(());
            }
            DOCKERD
                .get()
                .ok_or_else(|| Failed::from("no dockerd planned"))?
                .ensure()?;
        }
        let tiers: &[Tier] = if provisioner == "qemu" {
            &[
                Tier::Root,
                Tier::Qemu,
                Tier::Kernel,
                Tier::ImageTools,
                Tier::Etcd,
            ]
        } else if scenario.needs_kubeadm() {
            // Legacy nodes in network namespaces on the bridge, HAProxy, kubeadm's PKI.
            &[Tier::Root, Tier::Etcd, Tier::Haproxy, Tier::Openssl]
        } else if scenario.needs_airgap() {
            // Nodes in network namespaces, lab DNS (dig) and egress proxy (curl).
            &[Tier::Root, Tier::Etcd, Tier::Dns, Tier::Proxy]
        } else {
            &[Tier::Etcd]
        };
        if !kiln_test_tiers::check(&name, tiers) {
            return Ok(());
        }
        if provisioner == "qemu" {
            // Into the store `main` named in KILN_IMAGE_STORE, which the runner boots from.
            qemu_image_store().map_err(Failed::from)?;
        }
        let state = tempfile::Builder::new()
            .prefix("kiln-scenario")
            .tempdir()
            .map_err(|e| Failed::from(e.to_string()))?;
        let report = run(&scenario, &options(state.path(), provisioner));
        for s in &report.steps {
            println!(
                "  {} ({:.1}s){}",
                s.description,
                s.duration.as_secs_f64(),
                if s.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", s.detail)
                }
            );
        }
        println!("{}: {:.1}s", scenario.name, report.duration.as_secs_f64());
        match report.outcome {
            Outcome::Passed => Ok(()),
            Outcome::Skipped(why) => {
                // The only reason a process scenario skips here is a capability that needs root.
                kiln_test_tiers::skip(&name, Tier::Root, &why);
                Ok(())
            }
            Outcome::Failed { .. } => Err(report.failure_message().unwrap_or_default().into()),
        }
    })
}

/// Two scenario files written here (not shipped with Kiln), run side by side with `jobs = 2`:
/// the passing one passes, the failing one reports its step, reason and crash dump, neither
/// leaves its cluster behind, their networks differ, and both appear in the JUnit XML.
fn scenario_files_run_in_parallel_and_report() -> Result<(), Failed> {
    kiln_test_tiers::skip_unless!(Tier::Etcd);
    let files = tempfile::tempdir().unwrap();
    let prefix = std::env::var("KILN_SCENARIO_PREFIX").unwrap_or_default();
    std::fs::write(
        files.path().join("a-passes.yaml"),
        "name: engine-file-passes\n\
         description: a scenario written by a test\n\
         cluster:\n  nodes:\n    - role: controlplane\n\
         steps:\n  - writeKeys: {count: 20}\n  - assertWritable: {count: 5}\n  - assertMembers: 1\n  - assertNoLostWrites\n",
    )
    .unwrap();
    std::fs::write(
        files.path().join("b-fails.yaml"),
        "name: engine-file-fails\n\
         description: asserts a key nobody wrote\n\
         cluster:\n  nodes:\n    - role: controlplane\n\
         steps:\n  - writeKeys: {count: 5}\n  - assertKeyPresent: /never/written\n  - writeKeys: {count: 1}\n",
    )
    .unwrap();
    let scenarios = kiln_scenarios::file::load_all(&[], &[files.path().to_owned()])
        .map_err(|e| format!("{e:?}"))?;
    assert_eq!(scenarios.len(), 2);
    let state = tempfile::tempdir().unwrap();
    let artifacts = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        artifacts: artifacts.path().to_owned(),
        ..options(state.path(), "process")
    };
    let reports = runtime().block_on(runner::run_many(
        &scenarios,
        &["process".to_owned()],
        &opts,
        2,
    ));
    for r in &reports {
        for s in &r.steps {
            println!(
                "  [{}] {} ({:.1}s) {}",
                r.scenario,
                s.description,
                s.duration.as_secs_f64(),
                s.detail
            );
        }
    }
    let (pass, fail) = (&reports[0], &reports[1]);
    assert!(
        matches!(pass.outcome, Outcome::Passed),
        "{:?}",
        pass.outcome
    );
    let Outcome::Failed {
        step,
        reason,
        artifacts: dump,
    } = &fail.outcome
    else {
        return Err(format!("the scenario should fail, got {:?}", fail.outcome).into());
    };
    assert_eq!(step, "assert key \"/never/written\" is present");
    assert!(reason.contains("not in etcd"), "{reason}");
    assert_eq!(
        fail.steps.len(),
        3,
        "create, write, the failing assert; nothing after"
    );
    let message = fail.failure_message().unwrap();
    assert!(
        message.contains(&dump.display().to_string()) && message.contains(step),
        "{message}"
    );
    // Side by side on different networks (the create step names its network).
    let net = |r: &Report| {
        r.steps[0]
            .description
            .rsplit(' ')
            .next()
            .unwrap_or("")
            .to_owned()
    };
    assert_ne!(net(pass), net(fail), "parallel scenarios share a network");
    // The crash dump holds the state, the console logs and the service logs and events.
    assert!(dump.join("state.yaml").exists());
    let files: Vec<String> = std::fs::read_dir(dump)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for want in [
        "controlplane-1.log",
        "controlplane-1-etcd.log",
        "controlplane-1-services.txt",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(want)),
            "{want} not in {files:?}"
        );
    }
    // No cluster is left behind.
    for name in ["engine-file-passes", "engine-file-fails"] {
        let dir = state.path().join(format!("{prefix}{name}"));
        assert!(!dir.exists(), "state directory {} left", dir.display());
        kiln_os_api::wait::until_blocking(
            "no process of the cluster left",
            kiln_os_api::wait::Poll::every(Duration::from_millis(100), Duration::from_secs(10)),
            || {
                let left = kiln_provisioner::daemon::processes_under(&dir);
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{left:?}"))
                }
            },
        )
        .unwrap();
    }

    // The JUnit XML names the trials <provisioner>::<scenario> and a standard parser (Python's
    // ElementTree) accepts it.
    let skipped = Report {
        scenario: "x".into(),
        provisioner: "qemu".into(),
        outcome: Outcome::Skipped("not available".into()),
        steps: vec![],
        duration: Duration::ZERO,
    };
    let xml = artifacts.path().join("junit.xml");
    let mut all = reports.clone();
    all.push(skipped);
    kiln_scenarios::junit::write(&all, &xml).unwrap();
    let check = "import sys, xml.etree.ElementTree as ET\nr = ET.parse(sys.argv[1]).getroot()\ncases = {c.get('name'): c for c in r.findall('.//testcase')}\nassert sorted(cases) == ['process::engine-file-fails', 'process::engine-file-passes', 'qemu::x'], sorted(cases)\nassert cases['process::engine-file-passes'].find('failure') is None\nassert cases['process::engine-file-fails'].find('failure') is not None\nassert cases['qemu::x'].find('skipped') is not None\nprint('ok')";
    if !kiln_test_tiers::check("scenarios::junit", &[kiln_test_tiers::Tier::Python]) {
        return Ok(());
    }
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&xml)
        .output()
        .map_err(|e| format!("python3 (installed by scripts/install-deps): {e}"))?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Builds (if needed) and finds the `kiln` binary the clusters' helpers run as, and points
/// `KILN_BIN` at it: this harness is not `kiln` itself.
fn locate_kiln() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .ok_or("unexpected test binary location")?
        .to_owned();
    let release = profile_dir.ends_with("release");
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        // machined too: the docker provisioner's node image and the upgrade scenarios'
        // installers carry it.
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "kiln",
            "-p",
            "kiln-machined",
            "--bin",
            "kiln",
            "--bin",
            "machined",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build -p kiln failed".into());
        }
    }
    let bin = profile_dir.join("kiln");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} does not exist; build it with cargo build -p kiln",
            bin.display()
        ))
    }
}

/// Why the docker provisioner cannot run `scenario` at all, if it cannot: the air-gapped and
/// kubeadm rehearsals need their host tools. (What needs root is the trial's tier.)
fn docker_lacks(scenario: &Scenario) -> Option<String> {
    // Asked before the harness's engine runs, so not through `runner::unavailable` (which
    // asks the engine first).
    if scenario.needs_airgap()
        && let Some(why) = runner::missing_tool(runner::AIRGAP_TOOLS)
    {
        return Some(why);
    }
    if scenario.needs_kubeadm()
        && let Some(why) = runner::missing_tool(runner::KUBEADM_TOOLS)
    {
        return Some(why);
    }
    let docker = kiln_provisioner::provision::by_name("docker").ok()?;
    let caps = docker.capabilities(kiln_provisioner::state::NetworkMode::Bridge);
    scenario.needs_slots().then_some(caps.slots.err()).flatten()
}

fn main() {
    let mut args = Arguments::from_args();
    if !args.list {
        match locate_kiln() {
            Ok(bin) => set_kiln_bin(&bin),
            Err(e) => eprintln!("scenarios will fail: {e}"),
        }
    }
    if args.test_threads.is_none() {
        args.test_threads = Some(1);
    }
    let dockerd = DOCKERD.get_or_init(|| ScenarioDockerd {
        // Short: the engine's and containerd's sockets live under it.
        dir: std::env::temp_dir().join(format!("kscen-{}", std::process::id())),
        engine: std::sync::Mutex::new(None),
    });
    #[allow(unsafe_code)]
    // SAFETY: at the start of main, before the harness starts any thread.
    unsafe {
        std::env::set_var(
            "DOCKER_HOST",
            format!("unix://{}", dockerd.socket().display()),
        );
    }
    let mut trials = Vec::new();
    for scenario in catalog() {
        for provisioner in PROVISIONERS {
            if provisioner == "docker" {
                // The engine is the harness's own, started by the first docker trial; on it
                // (as root) the provisioner supports every step, upgrades included.
                if let Some(why) = docker_lacks(&scenario) {
                    if !args.list {
                        eprintln!("docker::{}: ignored: {why}", scenario.name);
                    }
                    trials.push(
                        Trial::test(format!("docker::{}", scenario.name), || Ok(()))
                            .with_ignored_flag(true),
                    );
                } else {
                    trials.push(scenario_trial(scenario.clone(), "docker"));
                }
                continue;
            }
            // The kubeadm rehearsal needs tiers (root, HAProxy, openssl) on process: its trial
            // checks them and says which is missing.
            let tiered =
                provisioner == "process" && (scenario.needs_kubeadm() || scenario.needs_airgap());
            match runner::unavailable(&scenario, provisioner).filter(|_| !tiered) {
                None => {
                    let trial = scenario_trial(scenario.clone(), provisioner);
                    // A qemu scenario costs minutes under TCG: CI runs QEMU_IN_CI, the rest
                    // with --include-ignored.
                    if provisioner == "qemu" && !QEMU_IN_CI.contains(&scenario.name.as_str()) {
                        if !args.list {
                            eprintln!(
                                "qemu::{}: ignored: minutes under TCG; run it with --include-ignored",
                                scenario.name
                            );
                        }
                        trials.push(trial.with_ignored_flag(true));
                    } else {
                        trials.push(trial);
                    }
                }
                // On process the only missing capability is root's bridge network: that is a
                // tier, and a required tier may not skip.
                Some(why) if provisioner == "process" => {
                    let name = format!("{provisioner}::{}", scenario.name);
                    trials.push(Trial::test(name.clone(), move || {
                        kiln_test_tiers::skip(&name, Tier::Root, &why);
                        Ok(())
                    }));
                }
                Some(why) => {
                    if !args.list {
                        eprintln!("{provisioner}::{}: ignored: {why}", scenario.name);
                    }
                    trials.push(
                        Trial::test(format!("{provisioner}::{}", scenario.name), || Ok(()))
                            .with_ignored_flag(true),
                    );
                }
            }
        }
    }
    trials.push(Trial::test(
        "engine::scenario-files-run-in-parallel-and-report",
        scenario_files_run_in_parallel_and_report,
    ));
    let conclusion = libtest_mimic::run(&args, trials);
    dockerd.stop();
    conclusion.exit();
}
