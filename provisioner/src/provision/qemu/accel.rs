//! Which accelerator QEMU uses: KVM only when a probe guest really boots with it within a
//! deadline, else TCG, with the reason. `/dev/kvm` alone is not trusted: under nested
//! virtualisation it can open while `-accel kvm` fails ("KVM internal error ... emulation
//! failure") and the guest hangs paused.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_os_api::wait::{Poll, until_blocking};

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The accelerator chosen and why (what `cluster show` prints).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// Why: "a probe guest booted with KVM in 0.8s", "no /dev/kvm", ...
    pub reason: String,
}

/// Boots a probe guest with an accelerator: `Ok(seconds)` when it reached the kernel within
/// `deadline`, `Err(why)` otherwise. The seam that tests replace.
pub trait ProbeGuest {
    /// Runs the probe.
    fn boot(&self, accel: Accel, deadline: Duration) -> Result<f64, String>;
}

/// Chooses KVM when `dev_kvm` opens read-write and the probe boots with it, TCG otherwise.
pub fn choose(dev_kvm: &Path, probe: &dyn ProbeGuest, deadline: Duration) -> AccelChoice {
    let tcg = |reason: String| AccelChoice {
        accel: Accel::Tcg,
        reason,
    };
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
    {
        return tcg(format!("{} cannot be opened: {e}", dev_kvm.display()));
    }
    match probe.boot(Accel::Kvm, deadline) {
        Ok(secs) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("a probe guest booted with KVM in {secs:.1}s"),
        },
        Err(why) => tcg(format!(
            "{} opens but a probe guest did not boot with KVM: {why}",
            dev_kvm.display()
        )),
    }
}

/// The real probe: QEMU boots `kernel` with no initramfs and `panic=-1`; the kernel panics
/// for want of a root file system and, with `-no-reboot`, QEMU exits. Booted = QEMU exited by
/// itself and the console shows the kernel's panic.
#[derive(Debug, Clone)]
pub struct QemuProbe {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// A kernel (bzImage or PVH `vmlinux`).
    pub kernel: PathBuf,
    /// Scratch directory for the console log.
    pub scratch: PathBuf,
}

/// What the probe's console must show: the kernel ran until it looked for a root file system.
const PANIC_LINE: &str = "Kernel panic";

impl ProbeGuest for QemuProbe {
    fn boot(&self, accel: Accel, deadline: Duration) -> Result<f64, String> {
        let log = self
            .scratch
            .join(format!("probe-{accel}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let accel_arg = match accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg,tb-size=64",
        };
        let start = std::time::Instant::now();
        let child = Command::new(&self.qemu)
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-machine", "q35", "-accel", accel_arg, "-m", "256"])
            .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
            .arg("-kernel")
            .arg(&self.kernel)
            .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-no-reboot")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.qemu.display()))?;
        let mut child = KillOnDrop(child);
        let exited = until_blocking(
            "the probe guest",
            Poll::every(Duration::from_millis(50), deadline),
            || match child.0.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_owned()),
                Err(e) => Err(e.to_string()),
            },
        );
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        match exited {
            Ok(status) if console.contains(PANIC_LINE) => {
                tracing::debug!(%accel, ?status, "probe guest booted");
                Ok(start.elapsed().as_secs_f64())
            }
            Ok(status) => {
                let mut stderr = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                Err(format!(
                    "QEMU exited ({status}) before the kernel ran: {}",
                    stderr.lines().next().unwrap_or("no message")
                ))
            }
            Err(_) => Err(format!(
                "no kernel panic on the console within {deadline:?} (the guest hangs)"
            )),
        }
    }
}

/// Kills the probe guest however the probe ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scripted(Result<f64, String>);

    impl ProbeGuest for Scripted {
        fn boot(&self, accel: Accel, _: Duration) -> Result<f64, String> {
            assert_eq!(accel, Accel::Kvm);
            self.0.clone()
        }
    }

    #[test]
    fn no_dev_kvm_means_tcg_without_a_probe() {
        struct Never;
        impl ProbeGuest for Never {
            fn boot(&self, _: Accel, _: Duration) -> Result<f64, String> {
                panic!("probe must not run")
            }
        }
        let c = choose(
            Path::new("/nonexistent/kvm"),
            &Never,
            Duration::from_secs(1),
        );
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("/nonexistent/kvm"), "{}", c.reason);
    }

    #[test]
    fn a_device_that_opens_is_trusted_only_when_the_probe_boots() {
        let dev = tempfile::NamedTempFile::new().unwrap();
        let hang = Scripted(Err("no kernel panic on the console within 10s".into()));
        let c = choose(dev.path(), &hang, Duration::from_secs(10));
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("did not boot with KVM"), "{}", c.reason);

        let c = choose(dev.path(), &Scripted(Ok(0.7)), Duration::from_secs(10));
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!(c.reason, "a probe guest booted with KVM in 0.7s");
    }
}
