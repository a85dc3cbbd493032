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
use kiln_scenarios::{Scenario, Step, catalog};
use libtest_mimic::{Arguments, Failed, Trial};

const PROVISIONERS: [&str; 3] = ["process", "qemu", "docker"];

fn artifacts() -> PathBuf {
    std::env::var_os("KILN_SCENARIO_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/scenario-artifacts")
        })
}

fn options(state: &std::path::Path, cidr_net: u8) -> RunOptions {
    RunOptions {
        provisioner: "process".into(),
        artifacts: artifacts(),
        keep_on_failure: false,
        state_base: state.to_owned(),
        cidr: format!("10.{cidr_net}.0.0/24"),
        verbose: true,
    }
}

fn run(scenario: &Scenario, opts: &RunOptions) -> Report {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(runner::run(scenario, opts))
}

fn set_kiln_bin(bin: &std::path::Path) {
    // Child processes get the variable through their environment; this process reads it only
    // through kiln_provisioner::daemon::kiln_binary.
    #[allow(unsafe_code)]
    // SAFETY: called at the start of main, before the harness starts any thread.
    unsafe {
        std::env::set_var("KILN_BIN", bin);
    }
}

fn have_etcd() -> bool {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn scenario_trial(scenario: Scenario, net: u8) -> Trial {
    Trial::test(format!("process::{}", scenario.name), move || {
        if !have_etcd() {
            println!("skipped: etcd is not installed (scripts/install-deps installs it)");
            return Ok(());
        }
        let state = tempfile::Builder::new()
            .prefix("kiln-scenario")
            .tempdir()
            .map_err(|e| Failed::from(e.to_string()))?;
        let report = run(&scenario, &options(state.path(), net));
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
                println!("skipped: {why}");
                Ok(())
            }
            Outcome::Failed { .. } => Err(report.failure_message().unwrap_or_default().into()),
        }
    })
}

fn failing_scenario_reports_and_cleans_up() -> Result<(), Failed> {
    if !have_etcd() {
        println!("skipped: etcd is not installed");
        return Ok(());
    }
    let scenario = Scenario {
        name: "engine-self-test",
        description: "asserts a key nobody wrote",
        steps: vec![
            Step::CreateCluster {
                controlplanes: 1,
                workers: 0,
                maintenance_workers: false,
            },
            Step::WriteKeys { count: 5 },
            Step::AssertKeyPresent("/never/written".into()),
            Step::WriteKeys { count: 1 },
        ],
    };
    let state = tempfile::tempdir().unwrap();
    let artifacts = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        artifacts: artifacts.path().to_owned(),
        ..options(state.path(), 139)
    };
    let report = run(&scenario, &opts);
    let Outcome::Failed {
        step,
        reason,
        artifacts: dump,
    } = &report.outcome
    else {
        return Err(format!("the scenario should fail, got {:?}", report.outcome).into());
    };
    assert_eq!(step, "assert key \"/never/written\" is present");
    assert!(reason.contains("not in etcd"), "{reason}");
    assert_eq!(
        report.steps.len(),
        3,
        "steps after the failure must not run"
    );
    let message = report.failure_message().unwrap();
    assert!(
        message.contains(&dump.display().to_string()) && message.contains(step),
        "{message}"
    );
    // The crash dump holds the state, the console logs and the service logs and events.
    assert!(dump.join("state.yaml").exists());
    let files: Vec<String> = std::fs::read_dir(dump)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("controlplane-1.log")),
        "{files:?}"
    );
    assert!(
        files.iter().any(|f| f.ends_with("controlplane-1-etcd.log")),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("controlplane-1-services.txt")),
        "{files:?}"
    );
    // No cluster is left behind.
    let dir = state.path().join("engine-self-test");
    assert!(!dir.exists(), "state directory left");
    let marker = dir.display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !kiln_provisioner::daemon::processes_mentioning(&marker).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "processes left: {:?}",
            kiln_provisioner::daemon::processes_mentioning(&marker)
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The JUnit XML of such a run is accepted by a standard parser (Python's ElementTree).
    let skipped = Report {
        scenario: "x".into(),
        provisioner: "qemu".into(),
        outcome: Outcome::Skipped("not available".into()),
        steps: vec![],
        duration: Duration::ZERO,
    };
    let xml = artifacts.path().join("junit.xml");
    kiln_scenarios::junit::write(&[report.clone(), skipped], &xml).unwrap();
    let check = "import sys, xml.etree.ElementTree as ET\nr = ET.parse(sys.argv[1]).getroot()\ncases = r.findall('.//testcase')\nassert len(cases) == 2, len(cases)\nassert cases[0].find('failure') is not None\nassert cases[1].find('skipped') is not None\nprint('ok')";
    match std::process::Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&xml)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => println!("skipped: python3 is not installed, the XML was not parsed"),
    }
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
        cmd.args(["build", "--quiet", "-p", "kiln", "--bin", "kiln"])
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
    let mut trials = Vec::new();
    for (i, scenario) in catalog().into_iter().enumerate() {
        for provisioner in PROVISIONERS {
            match runner::unavailable(&scenario, provisioner) {
                None => trials.push(scenario_trial(scenario.clone(), 120 + i as u8)),
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
        "engine::failing-scenario-reports-step-and-cleans-up",
        failing_scenario_reports_and_cleans_up,
    ));
    libtest_mimic::run(&args, trials).exit();
}
