//! Kernel modules for the initramfs: the modules a node needs and everything they depend on,
//! read from the module tree's `modules.dep`, in load order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The modules a Kiln node loads on `metal` (virtio and virtio_pci are built into the cloud
/// kernel).
pub const NODE_MODULES: &[&str] = &[
    "virtio_net",
    "virtio_blk",
    "bridge",
    "bonding",
    "8021q",
    // The ACPI power button (QMP `system_powerdown`) and netem (network fault scenarios).
    "button",
    "sch_netem",
    // machined reads the power button through evdev.
    "evdev",
    // The boot disk of the A/B slots (FAT, codepage 437, ASCII names).
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
];

/// Why the module set could not be resolved.
#[derive(Debug, Error)]
pub enum ModulesError {
    /// `modules.dep` could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A wanted module is neither a module nor built in.
    #[error(
        "module {name} is neither in {dep} nor in modules.builtin: is this the module tree of the \
         kernel being packed (--modules)?"
    )]
    Unknown {
        /// The module.
        name: String,
        /// The `modules.dep` read.
        dep: PathBuf,
    },
}

/// A resolved set of modules: paths relative to the module tree, dependencies before dependents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSet {
    /// Relative paths (`kernel/drivers/net/virtio_net.ko.xz`) in load order.
    pub files: Vec<String>,
    /// The `modules.dep` lines for exactly these files.
    pub dep_lines: Vec<String>,
}

/// The file name a module has in the initramfs: `.ko.xz` modules are packed decompressed.
pub fn unpacked_name(path: &str) -> &str {
    path.strip_suffix(".xz").unwrap_or(path)
}

/// A `modules.dep` line with every `.ko.xz` path renamed as [`unpacked_name`] does.
pub fn unpacked_dep_line(line: &str) -> String {
    line.split(' ')
        .map(|word| match word.strip_suffix(':') {
            Some(m) => format!("{}:", unpacked_name(m)),
            None => unpacked_name(word).to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The content of a module file, decompressed when it is `.ko.xz`.
pub fn unpacked(path: &Path) -> std::io::Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    if !path.to_string_lossy().ends_with(".ko.xz") {
        return Ok(data);
    }
    let mut out = Vec::with_capacity(data.len() * 4);
    lzma_rs::xz_decompress(&mut std::io::BufReader::new(&data[..]), &mut out)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("xz: {e}")))?;
    Ok(out)
}

/// The name modprobe knows a module file by: `kernel/net/8021q/8021q.ko.xz` → `8021q`, with
/// `-` and `_` equivalent.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves `wanted` (module names) against the tree at `tree`. Built-in modules are skipped.
pub fn resolve(tree: &Path, wanted: &[&str]) -> Result<ModuleSet, ModulesError> {
    let dep_path = tree.join("modules.dep");
    let text = std::fs::read_to_string(&dep_path).map_err(|source| ModulesError::Read {
        path: dep_path.clone(),
        source,
    })?;
    let builtin = std::fs::read_to_string(tree.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();
    resolve_text(&text, &builtin, wanted).map_err(|name| ModulesError::Unknown {
        name,
        dep: dep_path,
    })
}

/// [`resolve`] on the text of `modules.dep`; `Err(name)` names an unknown module.
pub fn resolve_text(
    dep: &str,
    builtin: &BTreeSet<String>,
    wanted: &[&str],
) -> Result<ModuleSet, String> {
    // file -> its direct dependencies; name -> file
    let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut by_name: BTreeMap<String, &str> = BTreeMap::new();
    let mut lines: BTreeMap<&str, &str> = BTreeMap::new();
    for line in dep.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(file, rest.split_whitespace().collect());
        by_name.insert(module_name(file), file);
        lines.insert(file, line);
    }
    let mut set = ModuleSet {
        files: Vec::new(),
        dep_lines: Vec::new(),
    };
    let mut seen = BTreeSet::new();
    // Depth-first, dependencies first: the order the kernel must load them in.
    fn visit<'a>(
        file: &'a str,
        deps: &BTreeMap<&'a str, Vec<&'a str>>,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<&'a str>,
    ) {
        if !seen.insert(file) {
            return;
        }
        for d in deps.get(file).into_iter().flatten() {
            visit(d, deps, seen, out);
        }
        out.push(file);
    }
    let mut order = Vec::new();
    for name in wanted {
        let key = name.replace('-', "_");
        match by_name.get(&key) {
            Some(file) => visit(file, &deps, &mut seen, &mut order),
            None if builtin.contains(&key) => {}
            None => return Err((*name).to_owned()),
        }
    }
    for file in order {
        set.files.push(file.to_owned());
        if let Some(line) = lines.get(file) {
            set.dep_lines.push((*line).to_owned());
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xz_modules_are_packed_decompressed_under_their_plain_name() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"\x7fELF a kernel module".repeat(100);
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &body[..], &mut xz).unwrap();
        let packed = dir.path().join("bonding.ko.xz");
        std::fs::write(&packed, &xz).unwrap();
        assert_eq!(unpacked(&packed).unwrap(), body);
        let plain = dir.path().join("plain.ko");
        std::fs::write(&plain, b"plain").unwrap();
        assert_eq!(unpacked(&plain).unwrap(), b"plain");
        std::fs::write(&packed, b"not xz").unwrap();
        assert!(unpacked(&packed).is_err());
        assert_eq!(
            unpacked_name("kernel/net/802/stp.ko.xz"),
            "kernel/net/802/stp.ko"
        );
        assert_eq!(
            unpacked_dep_line(
                "kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz"
            ),
            "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko"
        );
        assert_eq!(
            unpacked_dep_line("kernel/net/llc/llc.ko.xz:"),
            "kernel/net/llc/llc.ko:"
        );
    }

    const DEP: &str = "\
kernel/net/802/stp.ko.xz: kernel/net/llc/llc.ko.xz
kernel/net/llc/llc.ko.xz:
kernel/net/802/garp.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/802/mrp.ko.xz:
kernel/net/8021q/8021q.ko.xz: kernel/net/802/mrp.ko.xz kernel/net/802/garp.ko.xz kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz kernel/net/llc/llc.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/net/core/failover.ko.xz:
";

    #[test]
    fn dependencies_come_first_and_once() {
        let builtin = BTreeSet::from(["virtio_pci".to_owned()]);
        let set = resolve_text(
            DEP,
            &builtin,
            &["virtio_net", "bridge", "8021q", "virtio_pci"],
        )
        .unwrap();
        let names: Vec<String> = set.files.iter().map(|f| module_name(f)).collect();
        assert_eq!(
            names,
            [
                "failover",
                "net_failover",
                "virtio_net",
                "llc",
                "stp",
                "bridge",
                "mrp",
                "garp",
                "8021q"
            ]
        );
        assert_eq!(set.dep_lines.len(), set.files.len());
    }

    #[test]
    fn an_unknown_module_is_named() {
        let err = resolve_text(DEP, &BTreeSet::new(), &["bonding"]).unwrap_err();
        assert_eq!(err, "bonding");
    }
}
