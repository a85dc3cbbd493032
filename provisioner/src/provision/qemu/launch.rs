//! The QEMU command line of a node: memory, vCPUs, the accelerator (`-accel tcg,tb-size=64`
//! keeps an idle TCG guest near 250 MiB), a virtio disk, tap NICs with fixed MACs, the serial
//! console appended to a file, a QMP socket (power switch) and a human monitor socket (the
//! guides' `echo q | socat - unix-connect:...` quick reboot), `-no-reboot` so a guest reboot or
//! panic (`panic=-1`) ends QEMU and the launcher decides, and either direct kernel boot
//! (`--with-bootloader=false`) or OVMF + the disk's systemd-boot (`--with-uefi`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use super::accel::Accel;

/// Kernel arguments every directly booted node gets: the serial console, and a panic that
/// resets at once (QEMU's `-no-reboot` then exits, and the launcher sees it).
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Where OVMF lives (Debian's ovmf package).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// The template of the UEFI variable store; each node gets its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How the node boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads kernel and initramfs itself (a `vmlinux` boots through PVH, faster under
    /// TCG than a bzImage).
    Direct {
        /// `vmlinux` or `vmlinuz`.
        kernel: PathBuf,
        /// The initramfs.
        initrd: PathBuf,
        /// Kernel arguments after [`BASE_CMDLINE`].
        extra_cmdline: String,
    },
    /// OVMF firmware boots systemd-boot from the disk.
    Uefi {
        /// OVMF code (read-only).
        code: PathBuf,
        /// This node's copy of the variable store (writable: boot counting and one-shot
        /// entries live there).
        vars: PathBuf,
    },
}

/// A NIC on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nic {
    /// The tap device on the host (created by the lab and attached to the cluster bridge).
    pub tap: String,
    /// Fixed MAC (the DHCP server's static lease, for the first NIC).
    pub mac: String,
}

impl Nic {
    /// The QEMU device id of the `index`-th NIC, which `set_link` takes.
    pub fn id(index: usize) -> String {
        format!("nic{index}")
    }
}

/// Everything that goes on one node's QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLaunch {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Node name (QEMU's guest name).
    pub name: String,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// The accelerator (see [`super::accel::choose`]).
    pub accel: Accel,
    /// How it boots.
    pub boot: Boot,
    /// The raw disk image (a virtio disk), if any.
    pub disk: Option<PathBuf>,
    /// The boot disk of the A/B slots (a second virtio disk, see [`super::bootdisk`]), if any.
    pub boot_disk: Option<PathBuf>,
    /// NICs.
    pub nics: Vec<Nic>,
    /// File the serial console is appended to (`<node>.log`).
    pub console_log: PathBuf,
    /// QMP socket (`<node>.qmp`).
    pub qmp_socket: PathBuf,
    /// Human monitor socket (`<node>.monitor`).
    pub monitor_socket: PathBuf,
}

impl NodeLaunch {
    /// The arguments after the program name.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| a.extend(parts.iter().map(OsString::from));
        push(&[
            "-name",
            &format!("guest={},process=qemu-{}", self.name, self.name),
        ]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        push(&["-machine", "q35"]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            // A 64 MiB translation cache instead of the default (up to 1 GiB) roughly halves an
            // idle guest's RSS at no measurable boot cost.
            Accel::Tcg => push(&["-accel", "tcg,tb-size=64", "-cpu", "max"]),
        }
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-smp", &self.cpus.to_string()]);
        // Free-page reporting hands pages the guest freed back to the host.
        push(&["-device", "virtio-balloon-pci,free-page-reporting=on"]);
        push(&["-device", "virtio-rng-pci"]);
        push(&[
            "-chardev",
            &format!(
                "file,id=console,path={},append=on",
                self.console_log.display()
            ),
            "-serial",
            "chardev:console",
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ]);
        push(&[
            "-monitor",
            &format!("unix:{},server=on,wait=off", self.monitor_socket.display()),
        ]);
        // A guest reboot (or a panic with panic=-1) ends QEMU: the launcher restarts it, which
        // picks up a rebuilt kernel or initramfs.
        push(&["-no-reboot"]);
        match &self.boot {
            Boot::Direct {
                kernel,
                initrd,
                extra_cmdline,
            } => {
                a.push("-kernel".into());
                a.push(kernel.into());
                a.push("-initrd".into());
                a.push(initrd.into());
                a.push("-append".into());
                a.push(cmdline(extra_cmdline).into());
            }
            Boot::Uefi { code, vars } => {
                a.push("-drive".into());
                a.push(drive_arg("if=pflash,format=raw,unit=0,readonly=on", code));
                a.push("-drive".into());
                a.push(drive_arg("if=pflash,format=raw,unit=1", vars));
            }
        }
        if let Some(disk) = &self.disk {
            a.push("-drive".into());
            let format = if disk.extension().is_some_and(|e| e == "qcow2") {
                "qcow2"
            } else {
                "raw"
            };
            a.push(drive_arg(
                &format!("if=none,id=disk0,format={format},discard=unmap"),
                disk,
            ));
            a.push("-device".into());
            a.push("virtio-blk-pci,drive=disk0,bootindex=1".into());
        }
        if let Some(boot) = &self.boot_disk {
            a.push("-drive".into());
            a.push(drive_arg("if=none,id=boot0,format=raw", boot));
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-blk-pci,drive=boot0,serial={}",
                    super::bootdisk::BOOT_DISK_SERIAL
                )
                .into(),
            );
        }
        for (i, nic) in self.nics.iter().enumerate() {
            a.push("-netdev".into());
            a.push(format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap).into());
            a.push("-device".into());
            a.push(
                format!(
                    "virtio-net-pci,id={},netdev=net{i},mac={}",
                    Nic::id(i),
                    nic.mac
                )
                .into(),
            );
        }
        a
    }

    /// The command, ready to spawn.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.args());
        cmd
    }
}

/// The kernel command line of a directly booted node.
pub fn cmdline(extra: &str) -> String {
    let extra = extra.trim();
    if extra.is_empty() {
        BASE_CMDLINE.to_owned()
    } else {
        format!("{BASE_CMDLINE} {extra}")
    }
}

/// `-drive` options with `file=` last; QEMU's option syntax doubles commas in values.
fn drive_arg(options: &str, file: &std::path::Path) -> OsString {
    let mut s = OsString::from(options);
    s.push(",file=");
    s.push(file.to_string_lossy().replace(',', ",,"));
    s
}

/// A MAC address for node `index` of a cluster, stable across restarts: a locally administered
/// unicast prefix, two bytes from the cluster name, and the index.
pub fn node_mac(cluster: &str, index: u16) -> String {
    let h = cluster
        .bytes()
        .fold(0u16, |h, b| h.rotate_left(5) ^ u16::from(b));
    let [h1, h2] = h.to_be_bytes();
    let [i1, i2] = index.to_be_bytes();
    format!("52:54:{h1:02x}:{h2:02x}:{i1:02x}:{i2:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(boot: Boot) -> NodeLaunch {
        NodeLaunch {
            qemu: "qemu-system-x86_64".into(),
            name: "cp-1".into(),
            memory_mib: 512,
            cpus: 1,
            accel: Accel::Tcg,
            boot,
            disk: Some("/state/cp-1.raw".into()),
            boot_disk: None,
            nics: vec![Nic {
                tap: "kiln-tap0".into(),
                mac: "52:54:00:00:00:02".into(),
            }],
            console_log: "/state/cp-1.log".into(),
            qmp_socket: "/state/cp-1.qmp".into(),
            monitor_socket: "/state/cp-1.monitor".into(),
        }
    }

    fn joined(n: &NodeLaunch) -> String {
        n.args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn direct_boot_has_the_kernel_the_console_and_the_sockets() {
        let line = joined(&node(Boot::Direct {
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initramfs.zst".into(),
            extra_cmdline: "kiln.config=http://10.5.0.1/cp-1".into(),
        }));
        for want in [
            "-accel tcg,tb-size=64",
            "-m 512 -smp 1",
            "-kernel /img/vmlinux -initrd /img/initramfs.zst",
            "-append console=ttyS0 panic=-1 kiln.config=http://10.5.0.1/cp-1",
            "-chardev file,id=console,path=/state/cp-1.log,append=on -serial chardev:console",
            "-qmp unix:/state/cp-1.qmp,server=on,wait=off",
            "-monitor unix:/state/cp-1.monitor,server=on,wait=off",
            "-no-reboot",
            "file=/state/cp-1.raw -device virtio-blk-pci,drive=disk0",
            "-netdev tap,id=net0,ifname=kiln-tap0,script=no,downscript=no",
            "-device virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:00:00:02",
        ] {
            assert!(line.contains(want), "missing {want:?} in {line}");
        }
        assert!(!line.contains("pflash"));
    }

    #[test]
    fn uefi_boot_uses_ovmf_and_no_kernel() {
        let mut n = node(Boot::Uefi {
            code: OVMF_CODE.into(),
            vars: "/state/cp,1.vars".into(),
        });
        n.accel = Accel::Kvm;
        let line = joined(&n);
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(line.contains(
            "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ));
        assert!(line.contains("if=pflash,format=raw,unit=1,file=/state/cp,,1.vars"));
        assert!(!line.contains("-kernel"));
    }

    #[test]
    fn macs_are_stable_local_unicast_and_distinct() {
        let a = node_mac("kiln-default", 2);
        assert_eq!(a, node_mac("kiln-default", 2));
        assert_ne!(a, node_mac("kiln-default", 3));
        assert_ne!(a, node_mac("a-2", 2));
        assert!(a.starts_with("52:54:"));
        assert_eq!(cmdline("  "), BASE_CMDLINE);
    }
}
