//! The reference init: the bare "kernel + etcd" boot that Kiln OS's boot time is measured
//! against, and the init of the QEMU boot tests. As PID 1 it mounts the kernel file systems,
//! brings up `lo`, starts etcd on it, polls `etcdctl endpoint health`, prints
//! [`HEALTHY_MARKER`] with the kernel's uptime on the console, and then never exits.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_os_api::wait::{Poll, until_blocking};

/// The console line that says etcd is healthy (followed by the uptime in seconds).
pub const HEALTHY_MARKER: &str = "kiln-etcd-init: etcd healthy after";

/// Runs as PID 1. Never returns.
pub fn run() -> ! {
    say("kiln-etcd-init: starting");
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        if let Err(e) = nix::mount::mount(
            Some(source),
            target,
            Some(fstype),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        ) {
            say(&format!("kiln-etcd-init: mounting {target}: {e}"));
        }
    }
    if let Err(e) = loopback::up() {
        say(&format!("kiln-etcd-init: bringing up lo: {e}"));
    }
    let log = std::fs::File::create("/run/etcd.log").ok();
    let etcd = Command::new("/usr/bin/etcd")
        .args([
            "--name=reference",
            "--data-dir=/run/etcd",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=reference=http://127.0.0.1:2380",
        ])
        .env("PATH", "/usr/bin:/usr/sbin")
        .stdin(Stdio::null())
        .stdout(
            log.as_ref()
                .and_then(|f| f.try_clone().ok())
                .map_or_else(Stdio::null, Stdio::from),
        )
        .stderr(log.map_or_else(Stdio::null, Stdio::from))
        .spawn();
    match etcd {
        Err(e) => say(&format!("kiln-etcd-init: starting etcd: {e}")),
        Ok(_) => {
            let healthy = until_blocking(
                "etcd health",
                Poll::every(Duration::from_millis(100), Duration::from_secs(300)),
                || {
                    let out = Command::new("/usr/bin/etcdctl")
                        .args([
                            "--endpoints=http://127.0.0.1:2379",
                            "--dial-timeout=1s",
                            "--command-timeout=1s",
                            "endpoint",
                            "health",
                        ])
                        .env("ETCDCTL_API", "3")
                        .stdin(Stdio::null())
                        .output()
                        .map_err(|e| e.to_string())?;
                    if out.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
                    }
                },
            );
            match healthy {
                Ok(()) => say(&format!("{HEALTHY_MARKER} {}s", uptime())),
                Err(e) => say(&format!("kiln-etcd-init: {e}")),
            }
        }
    }
    // PID 1 never exits: reap children (etcd) forever, then wait for the power to go.
    loop {
        if nix::sys::wait::wait().is_err() {
            std::thread::park();
        }
    }
}

/// The kernel's uptime (`/proc/uptime`, first field).
fn uptime() -> String {
    std::fs::read_to_string(Path::new("/proc/uptime"))
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn say(line: &str) {
    println!("{line}");
}

#[allow(unsafe_code)]
mod loopback {
    //! Brings `lo` up with `SIOCSIFFLAGS` (the kernel starts it down), without netlink.

    use std::os::fd::AsRawFd as _;

    use nix::libc;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

    nix::ioctl_write_ptr_bad!(set_flags, libc::SIOCSIFFLAGS, libc::ifreq);

    pub(super) fn up() -> nix::Result<()> {
        let sock = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // SAFETY: ifreq is a plain C struct of integers, arrays and a union of such; all zeroes
        // is a valid value of it.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        // SAFETY: the descriptor is an open socket owned by this function, and `req` is a valid,
        // initialised ifreq that outlives the call; SIOCSIFFLAGS only reads it.
        unsafe { set_flags(sock.as_raw_fd(), &req) }.map(drop)
    }
}
