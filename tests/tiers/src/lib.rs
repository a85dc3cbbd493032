//! Test tiers: what a test needs from the machine (root, etcd, Docker, QEMU, a peer), and the
//! rule that a tier the machine is required to support never skips.
//!
//! # Design
//!
//! A test that needs something the machine may lack starts with
//! `kiln_test_tiers::skip_unless!(Tier::Root, Tier::Etcd);`. Each tier has one probe here
//! (a binary that answers `--version`, the effective uid). When a probe fails:
//! - if the tier is named in `KILN_REQUIRE_TIERS` (comma-separated; `scripts/test` sets it to
//!   every tier this machine supports), the test panics: a required tier that skips is a failure;
//! - otherwise the test prints `skipped: <reason>` and returns.
//!
//! Every check is also appended to the file named by `KILN_TIER_REPORT` (one line:
//! `tier<TAB>ran|skipped<TAB>test<TAB>reason`), from which `scripts/tier-summary` prints one
//! line per tier at the end of the run.
//!
//! # Limitations
//!
//! Probes check that a tool is installed and answers, not that every feature of it works; a
//! test that finds a deeper problem fails on its own.

pub mod dockerd;

use std::io::Write as _;
use std::process::{Command, Stdio};

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    /// Effective uid 0: bridges, network namespaces, netfilter, Docker.
    Root,
    /// Debian's `etcd` and `etcdctl` (etcd-server, etcd-client).
    Etcd,
    /// `openssl` for certificate checks against an independent implementation.
    Openssl,
    /// The registry peers: `skopeo` and Debian's `docker-registry` (the distribution registry).
    Skopeo,
    /// Debian's Docker Engine (`dockerd` and `docker`), started by the tests themselves; root.
    Docker,
    /// `haproxy`, the load-balancer peer.
    Haproxy,
    /// `iptables` or `nft`, to check the host firewall rules the lab adds and removes.
    Firewall,
    /// `qemu-system-x86_64` (from bookworm-backports).
    Qemu,
    /// `python3`, used by tests to parse XML and JSON independently.
    Python,
    /// The DHCP and TFTP peers: busybox `udhcpc`, ISC `dhclient`, `dhcpcd` and `atftp`.
    Dhcp,
    /// Debian's cloud kernel and its modules (`/boot/vmlinuz-*-cloud-amd64` with
    /// `/usr/lib/modules/<release>/modules.dep`), from bookworm-backports.
    Kernel,
    /// What the image builder writes disks with: `sgdisk`, `mkfs.vfat`, mtools, systemd-boot
    /// and OVMF.
    ImageTools,
    /// `dig` (bind9-dnsutils) and `unbound`: DNS client and resolver peer of the lab DNS.
    Dns,
    /// `curl` and `tinyproxy`: HTTP client and proxy peer of the egress proxy.
    Proxy,
}

impl Tier {
    /// Every tier, in the order the summary prints them.
    pub const ALL: &'static [Tier] = &[
        Tier::Root,
        Tier::Etcd,
        Tier::Openssl,
        Tier::Skopeo,
        Tier::Docker,
        Tier::Haproxy,
        Tier::Firewall,
        Tier::Qemu,
        Tier::Python,
        Tier::Dhcp,
        Tier::Kernel,
        Tier::ImageTools,
        Tier::Dns,
        Tier::Proxy,
    ];

    /// The tier's name in `KILN_REQUIRE_TIERS` and the summary.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Root => "root",
            Tier::Etcd => "etcd",
            Tier::Openssl => "openssl",
            Tier::Skopeo => "skopeo",
            Tier::Docker => "docker",
            Tier::Haproxy => "haproxy",
            Tier::Firewall => "firewall",
            Tier::Qemu => "qemu",
            Tier::Python => "python",
            Tier::Dhcp => "dhcp",
            Tier::Kernel => "kernel",
            Tier::ImageTools => "image-tools",
            Tier::Dns => "dns",
            Tier::Proxy => "proxy",
        }
    }

    /// Parses a tier name.
    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.iter().copied().find(|t| t.name() == name)
    }

    /// Why this machine cannot run the tier, or `None` when it can.
    pub fn probe(self) -> Option<String> {
        let install = "(scripts/install-deps installs it)";
        match self {
            Tier::Root => (!nix::unistd::geteuid().is_root())
                .then(|| "needs root (bridges, network namespaces, netfilter)".to_owned()),
            Tier::Etcd => (!answers("etcd", &["--version"]) || !answers("etcdctl", &["version"]))
                .then(|| format!("etcd/etcdctl are not installed {install}")),
            Tier::Openssl => (!answers("openssl", &["version"]))
                .then(|| format!("openssl is not installed {install}")),
            Tier::Skopeo => (!answers("skopeo", &["--version"])
                || !answers("docker-registry", &["--version"]))
            .then(|| format!("skopeo or docker-registry is not installed {install}")),
            Tier::Docker => {
                if !nix::unistd::geteuid().is_root() {
                    Some("Docker Engine needs root".to_owned())
                } else if !answers("dockerd", &["--version"])
                    || !answers("/usr/bin/docker", &["--version"])
                {
                    Some(format!(
                        "Debian's docker.io (dockerd, /usr/bin/docker) is not installed {install}"
                    ))
                } else {
                    None
                }
            }
            Tier::Haproxy => (!answers("haproxy", &["-v"]))
                .then(|| format!("haproxy is not installed {install}")),
            Tier::Firewall => {
                if !nix::unistd::geteuid().is_root() {
                    Some("reading and changing the host firewall needs root".to_owned())
                } else if !answers("iptables", &["--version"]) {
                    Some(format!("iptables is not installed {install}"))
                } else {
                    None
                }
            }
            Tier::Qemu => (!answers("qemu-system-x86_64", &["--version"]))
                .then(|| format!("qemu-system-x86_64 is not installed {install}")),
            Tier::Python => {
                (!answers("python3", &["--version"])).then(|| "python3 is not installed".to_owned())
            }
            Tier::Dhcp => (!answers("busybox", &["udhcpc", "--help"])
                || !answers("dhclient", &["--version"])
                || !answers("dhcpcd", &["--version"])
                || !answers("atftp", &["--version"]))
            .then(|| format!("busybox (udhcpc), dhclient, dhcpcd or atftp is missing {install}")),
            Tier::Kernel => (!cloud_kernel_installed()).then(|| {
                format!("no /boot/vmlinuz-*-cloud-amd64 with its modules (linux-image-cloud-amd64) {install}")
            }),
            Tier::ImageTools => {
                let missing: Vec<&str> = [
                    ("sgdisk", answers("sgdisk", &["--version"])),
                    ("mkfs.vfat", answers("mkfs.vfat", &["--help"])),
                    ("mcopy", answers("mcopy", &["--version"])),
                    (
                        "systemd-bootx64.efi",
                        std::path::Path::new(SYSTEMD_BOOT).is_file(),
                    ),
                    ("OVMF", std::path::Path::new(OVMF_CODE).is_file()),
                ]
                .into_iter()
                .filter_map(|(name, ok)| (!ok).then_some(name))
                .collect();
                (!missing.is_empty())
                    .then(|| format!("{} not installed {install}", missing.join(", ")))
            }
            Tier::Dns => (!answers("dig", &["-v"]) || !answers("unbound", &["-V"]))
                .then(|| format!("dig (bind9-dnsutils) or unbound is not installed {install}")),
            Tier::Proxy => (!answers("curl", &["--version"]) || !answers("tinyproxy", &["-v"]))
                .then(|| format!("curl or tinyproxy is not installed {install}")),
        }
    }
}

/// systemd-boot as systemd-boot-efi installs it.
const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";
/// OVMF's code image as the ovmf package installs it.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// A Debian cloud kernel in /boot whose module tree has a modules.dep.
fn cloud_kernel_installed() -> bool {
    std::fs::read_dir("/boot").is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .is_some_and(|release| {
                    release.ends_with("-cloud-amd64")
                        && std::path::Path::new("/usr/lib/modules")
                            .join(release)
                            .join("modules.dep")
                            .is_file()
                })
        })
    })
}

fn answers(bin: &str, args: &[&str]) -> bool {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The tiers named in `KILN_REQUIRE_TIERS`.
pub fn required() -> Vec<Tier> {
    std::env::var("KILN_REQUIRE_TIERS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|s| Tier::from_name(s.trim()))
        .collect()
}

/// Checks `tiers` for the test called `test`: `true` when all are available. A missing tier
/// prints `skipped: <reason>` and returns `false`, or panics when the tier is required.
pub fn check(test: &str, tiers: &[Tier]) -> bool {
    let required = required();
    let mut ok = true;
    for &tier in tiers {
        let why = tier.probe();
        record(tier, test, why.as_deref());
        if let Some(why) = why {
            if required.contains(&tier) {
                panic!(
                    "{test}: tier `{}` is required on this machine (KILN_REQUIRE_TIERS) but would skip: {why}",
                    tier.name()
                );
            }
            println!("skipped: {why}");
            ok = false;
        }
    }
    ok
}

/// Records a skip that no probe can see (for example "uid 65534 cannot run the binary"): prints
/// it, and panics when `tier` is required.
pub fn skip(test: &str, tier: Tier, why: &str) {
    record(tier, test, Some(why));
    if required().contains(&tier) {
        panic!(
            "{test}: tier `{}` is required on this machine (KILN_REQUIRE_TIERS) but would skip: {why}",
            tier.name()
        );
    }
    println!("skipped: {why}");
}

fn record(tier: Tier, test: &str, why: Option<&str>) {
    let Some(path) = std::env::var_os("KILN_TIER_REPORT") else {
        return;
    };
    let line = format!(
        "{}\t{}\t{}\t{}\n",
        tier.name(),
        if why.is_some() { "skipped" } else { "ran" },
        test,
        why.unwrap_or("").replace(['\t', '\n'], " ")
    );
    // One short append per line keeps concurrent test threads and binaries from interleaving.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// What a skipped test returns: `()` or `Ok(())`.
pub trait Skipped {
    /// The value a skipped test returns.
    fn skipped() -> Self;
}

impl Skipped for () {
    fn skipped() -> Self {}
}

impl<E> Skipped for Result<(), E> {
    fn skipped() -> Self {
        Ok(())
    }
}

/// Returns from the calling test (printing why) unless every tier is available; panics when a
/// missing tier is required. The test's name is taken from the enclosing module and line.
#[macro_export]
macro_rules! skip_unless {
    ($($tier:expr),+ $(,)?) => {
        if !$crate::check(concat!(module_path!(), ":", line!()), &[$($tier),+]) {
            return $crate::Skipped::skipped();
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &t in Tier::ALL {
            assert_eq!(Tier::from_name(t.name()), Some(t));
        }
        assert_eq!(Tier::from_name("nope"), None);
    }
}
