//! Kiln OS image builder: from Debian packages and this workspace, with no network beyond the
//! package mirror, it builds what a `metal` node boots.
//!
//! - the kernel (`vmlinuz` from `linux-image-cloud-amd64`, or a custom one) and the
//!   uncompressed `vmlinux` cut out of its zstd payload ([`kernel`]), which QEMU boots through
//!   PVH without the in-guest decompression that costs seconds under TCG;
//! - an initramfs ([`initramfs`]): a zstd newc cpio with machined as `/init`, etcd, etcdctl,
//!   `mke2fs`, the shared libraries they link ([`elf`]) and the node's kernel modules with their
//!   dependencies ([`modules`]); no shell;
//! - a raw GPT disk image ([`disk`]) with EFI, BOOT-A, BOOT-B, META, STATE and EPHEMERAL and
//!   systemd-boot with boot counting, built without loop devices;
//! - an installer OCI image layout ([`oci`]) carrying kernel and initramfs for upgrades;
//! - the node root filesystem for containers ([`rootfs`]): machined, etcd, etcdctl and their
//!   libraries as a tar stream, which the docker provisioner imports as `kiln/node:<version>`.
//!
//! Outputs go to `~/.kiln/images/<version>/` ([`store`]) with a manifest of input and output
//! digests; a build whose inputs did not change is skipped ([`builder`]).
//!
//! # Design
//!
//! The library does the work and reports steps through [`builder::Progress`]; the `kiln image`
//! command only parses flags and draws progress. Everything is written by this crate in Rust
//! (cpio, vmlinux extraction, module and library closure, OCI documents) except the disk: GPT
//! and FAT are written by `sgdisk`, `mkfs.vfat --offset` and `mcopy` from Debian, which are
//! made for it and need no loop device or root. The same inputs give the same initramfs bytes
//! (sorted entries, zero mtimes and owners). The default version is the crate version plus the
//! first 12 hex digits of the digest over all inputs, so a changed input is a new directory and
//! old images stay until removed.
//!
//! [`reference_init`] is the bare "kernel + etcd" init that Kiln OS's boot is measured against.
//!
//! # Limitations
//!
//! - amd64 and Debian paths only (library directories, `/usr/lib/modules`, systemd-boot).
//! - systemd-boot reads kernels only from the EFI partition, so the slots' kernels and
//!   initramfs live there (`/kiln/a`, `/kiln/b`); BOOT-A and BOOT-B are small FAT file systems
//!   holding each slot's record (`slot.yaml`). A fresh disk populates slot A only.
//! - STATE, EPHEMERAL and META are left zeroed: machined formats and fills them on first boot.
//! - The disk image is not digested (a sparse file of mostly zeroes); its size is recorded.

pub mod builder;
pub mod disk;
pub mod elf;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod oci;
pub mod reference_init;
pub mod rootfs;
pub mod store;

pub use builder::{BuildError, BuildOptions, Built, Progress, Quiet, build};
pub use kernel::KernelSource;
pub use store::{ImageManifest, list};
