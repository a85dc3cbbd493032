//! `kiln-etcd-init`: the reference init (kernel + etcd, no machined) that the QEMU boot tests
//! and the boot benchmark put at `/init`; see `kiln_image::reference_init`.

fn main() {
    kiln_image::reference_init::run()
}
