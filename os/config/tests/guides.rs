//! Every configuration example of the guides parses and validates when placed in a full
//! document, and documents round-trip through YAML unchanged.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use kiln_config::{Mode, Patch, from_yaml, to_yaml, validate};

fn snippets() -> Vec<(String, String)> {
    let dir = common::data_dir().join("guide-snippets");
    let mut out: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(
        out.len() >= 10,
        "guide snippets missing from {}",
        dir.display()
    );
    out
}

#[test]
fn every_guide_snippet_parses_in_a_full_document() {
    for (name, text) in snippets() {
        for base in [common::controlplane(), common::worker()] {
            let patch = Patch::parse(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let merged = kiln_config::patch::apply(&base, &[patch])
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let report = validate(&merged, Mode::Metal);
            assert!(
                report.errors.is_empty(),
                "{name} ({}): {:?}",
                base.machine.machine_type,
                report.errors
            );
        }
    }
}

#[test]
fn snippet_values_land_where_the_guides_say() {
    let text =
        std::fs::read_to_string(common::data_dir().join("guide-snippets/bond.yaml")).unwrap();
    let cfg = kiln_config::patch::apply(
        &common::controlplane(),
        &[Patch::parse(&text, "bond").unwrap()],
    )
    .unwrap();
    let dev = &cfg.network().interfaces[0];
    let bond = dev.bond.as_ref().unwrap();
    assert_eq!(dev.interface, "bond0");
    assert_eq!(bond.mode.as_deref(), Some("802.3ad"));
    assert_eq!(bond.xmit_hash_policy.as_deref(), Some("layer3+4"));
    assert_eq!(bond.interfaces, ["eth0", "eth1"]);

    let text =
        std::fs::read_to_string(common::data_dir().join("guide-snippets/etcd-quota.yaml")).unwrap();
    let cfg = kiln_config::patch::apply(
        &common::controlplane(),
        &[Patch::parse(&text, "quota").unwrap()],
    )
    .unwrap();
    let etcd = cfg.cluster.etcd.unwrap();
    assert_eq!(etcd.extra_args["quota-backend-bytes"], "4294967296");
    assert!(etcd.ca.is_some(), "merging extraArgs must keep the etcd CA");

    let text =
        std::fs::read_to_string(common::data_dir().join("guide-snippets/air-gapped-proxy.yaml"))
            .unwrap();
    let cfg =
        kiln_config::patch::apply(&common::worker(), &[Patch::parse(&text, "proxy").unwrap()])
            .unwrap();
    assert_eq!(cfg.machine.files[0].permissions, 0o644);
    assert_eq!(cfg.machine.files[0].op, "append");
}

#[test]
fn documents_round_trip_through_yaml_unchanged() {
    let mut docs = vec![common::controlplane(), common::worker()];
    for (name, text) in snippets() {
        docs.push(
            kiln_config::patch::apply(
                &common::controlplane(),
                &[Patch::parse(&text, &name).unwrap()],
            )
            .unwrap(),
        );
    }
    for doc in docs {
        let text = to_yaml(&doc).unwrap();
        let back = from_yaml(&text).unwrap();
        assert_eq!(back, doc);
        // And the text itself is stable: rendering the parsed document gives the same text.
        assert_eq!(to_yaml(&back).unwrap(), text);
    }
}

#[test]
fn worker_documents_carry_no_ca_keys() {
    let w = common::worker();
    assert!(w.machine.ca.as_ref().unwrap().key.is_empty());
    assert!(w.cluster.ca.as_ref().unwrap().key.is_empty());
    assert!(w.cluster.etcd.is_none());
    assert!(w.cluster.service_account.is_none());
    assert!(w.cluster.aggregator_ca.is_none());
    let report = validate(&w, Mode::Metal);
    assert!(
        report.errors.is_empty() && report.warnings.is_empty(),
        "{report:?}"
    );
}
