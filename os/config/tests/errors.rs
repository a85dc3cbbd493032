//! Unknown fields and semantic errors give messages that name the field and the fix.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use kiln_config::{Mode, Patch, from_yaml, validate};

fn errors_of(patch: &str) -> Vec<String> {
    let cfg = kiln_config::patch::apply(
        &common::controlplane(),
        &[Patch::parse(patch, "test").unwrap()],
    )
    .unwrap();
    validate(&cfg, Mode::Metal)
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn assert_one_error(patch: &str, path: &str, needles: &[&str]) {
    let errors = errors_of(patch);
    let hit: Vec<_> = errors
        .iter()
        .filter(|e| e.starts_with(&format!("{path}:")))
        .collect();
    assert_eq!(
        hit.len(),
        1,
        "expected one error at {path}, got {errors:#?}"
    );
    for n in needles {
        assert!(hit[0].contains(n), "{:?} lacks {n:?}", hit[0]);
    }
}

#[test]
fn unknown_field_is_rejected_with_path_and_line() {
    let text =
        common::controlplane_yaml().replacen("  install:\n", "  install:\n    diks: /dev/sdb\n", 1);
    let line = text.lines().position(|l| l.contains("diks")).unwrap() + 1;
    let err = from_yaml(&text).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("machine.install"), "{msg}");
    assert!(msg.contains("unknown field `diks`"), "{msg}");
    assert!(msg.contains("expected one of `disk`"), "{msg}");
    assert_eq!(err.line, Some(line), "{msg}");
}

#[test]
fn unknown_top_level_and_nested_list_fields() {
    let err = from_yaml(&format!("{}extra: 1\n", common::controlplane_yaml()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `extra`"), "{err}");
    let text = common::controlplane_yaml().replacen(
        "  network: {}\n",
        "  network:\n    interfaces:\n      - interface: eth0\n        routes:\n          - network: 0.0.0.0/0\n            gw: 10.0.0.1\n",
        1,
    );
    let err = from_yaml(&text).unwrap_err().to_string();
    assert!(
        err.contains("machine.network.interfaces[0].routes[0]"),
        "{err}"
    );
    assert!(err.contains("unknown field `gw`"), "{err}");
}

#[test]
fn bad_cidr_names_field_and_fix() {
    assert_one_error(
        "machine: {network: {interfaces: [{interface: eth0, addresses: [10.0.0.300/24]}]}}",
        "machine.network.interfaces[0].addresses[0]",
        &["not a valid CIDR", "prefix length"],
    );
    assert_one_error(
        "cluster: {network: {podSubnets: [10.244.0.0]}}",
        "cluster.network.podSubnets[1]",
        &["not a valid CIDR"],
    );
}

#[test]
fn bond_member_configured_on_its_own() {
    assert_one_error(
        "machine: {network: {interfaces: [
            {interface: bond0, dhcp: true, bond: {mode: 802.3ad, interfaces: [eth0, eth1]}},
            {interface: eth0, addresses: [10.0.0.2/24]}]}}",
        "machine.network.interfaces[1]",
        &[
            "enslaved to the bond \"bond0\"",
            "also configured on its own",
            "move its addresses",
        ],
    );
}

#[test]
fn control_plane_without_etcd_ca() {
    assert_one_error(
        "cluster: {etcd: {ca: {$patch: delete}}}",
        "cluster.etcd.ca",
        &["needs the etcd CA", "--with-secrets"],
    );
}

#[test]
fn endpoint_must_be_https() {
    assert_one_error(
        "cluster: {controlPlane: {endpoint: 'http://10.5.0.1:6443'}}",
        "cluster.controlPlane.endpoint",
        &["not an https URL", "https://HOST:6443"],
    );
    assert_one_error(
        "cluster: {controlPlane: {endpoint: '10.5.0.1:6443'}}",
        "cluster.controlPlane.endpoint",
        &["not an https URL"],
    );
}

#[test]
fn other_semantic_errors() {
    assert_one_error(
        "machine: {network: {interfaces: [{interface: bond0, bond: {mode: fast, interfaces: [eth0]}}]}}",
        "machine.network.interfaces[0].bond.mode",
        &["unknown value", "802.3ad"],
    );
    assert_one_error(
        "machine: {network: {interfaces: [{interface: eth0, vlans: [{vlanId: 5000}]}]}}",
        "machine.network.interfaces[0].vlans[0].vlanId",
        &["1 to 4094"],
    );
    assert_one_error(
        "machine: {files: [{content: x, path: etc/x, op: create}]}",
        "machine.files[0].path",
        &["absolute"],
    );
    assert_one_error(
        "machine: {files: [{content: x, path: /var/etc/x, op: replace}]}",
        "machine.files[0].op",
        &["create, append, overwrite"],
    );
    assert_one_error(
        "machine: {files: [{content: x, path: /etc/x, op: create}]}",
        "machine.files[0].path",
        &["not writable", "write under /var"],
    );
    assert_one_error(
        "machine: {files: [{content: x, path: /etc/ssl/certs/ca-certificates, op: overwrite}]}",
        "machine.files[0].op",
        &["only be appended to"],
    );
    assert_one_error(
        "machine: {features: {kubernetesTalosAPIAccess: {enabled: true, allowedRoles: [os:root]}}}",
        "machine.features.kubernetesTalosAPIAccess.allowedRoles[0]",
        &["os:reader"],
    );
    assert_one_error(
        "machine: {registries: {mirrors: {docker.io: {endpoints: [10.5.0.1:5000]}}}}",
        "machine.registries.mirrors.docker.io.endpoints[0]",
        &["http or https URL"],
    );
    assert_one_error(
        "cluster: {etcd: {extraArgs: {data-dir: /tmp}}}",
        "cluster.etcd.extraArgs.data-dir",
        &["set by machined"],
    );
    assert_one_error(
        "machine: {token: nope}",
        "machine.token",
        &["kubeadm token create"],
    );
    assert_one_error(
        "machine: {install: {disk: sda}}",
        "machine.install.disk",
        &["/dev"],
    );
}

#[test]
fn swapped_ca_keys_are_a_mismatch() {
    let mut cfg = common::controlplane();
    let etcd_key = cfg
        .cluster
        .etcd
        .as_ref()
        .unwrap()
        .ca
        .as_ref()
        .unwrap()
        .key
        .clone();
    cfg.cluster.ca.as_mut().unwrap().key = etcd_key;
    let errors = validate(&cfg, Mode::Metal).errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].path, "cluster.ca");
    assert!(
        errors[0].message.contains("does not match"),
        "{}",
        errors[0]
    );
}

#[test]
fn modes_differ_in_install_and_network() {
    let cfg = kiln_config::patch::apply(
        &common::worker(),
        &[Patch::parse("machine: {install: {$patch: delete}, network: {interfaces: [{interface: eth0, dhcp: true}]}}", "t").unwrap()],
    )
    .unwrap();
    let metal = validate(&cfg, Mode::Metal);
    assert!(
        metal
            .errors
            .iter()
            .any(|e| e.path == "machine.install.disk"),
        "{metal:?}"
    );
    let container = validate(&cfg, Mode::Container);
    assert!(container.errors.is_empty(), "{container:?}");
    let process = validate(&cfg, Mode::Process);
    assert!(process.errors.is_empty());
    assert!(
        process
            .warnings
            .iter()
            .any(|w| w.path == "machine.network.interfaces"),
        "{process:?}"
    );
    assert!(!process.is_ok(true), "--strict turns warnings into errors");
}

#[test]
fn a_device_selector_picks_a_link_instead_of_a_name() {
    let ok = errors_of(
        "machine: {network: {interfaces: [
            {deviceSelector: {hardwareAddr: '52:54:00:*', driver: virtio_net}, dhcp: true},
            {interface: bond0, dhcp: true, bond: {mode: active-backup,
              deviceSelectors: [{driver: virtio_net, physical: true}]}}]}}",
    );
    assert!(ok.is_empty(), "{ok:#?}");
    assert_one_error(
        "machine: {network: {interfaces: [{interface: eth0, deviceSelector: {driver: e1000}}]}}",
        "machine.network.interfaces[0]",
        &["both interface \"eth0\" and a deviceSelector", "not both"],
    );
    assert_one_error(
        "machine: {network: {interfaces: [{deviceSelector: {}, dhcp: true}]}}",
        "machine.network.interfaces[0].deviceSelector",
        &["selects nothing", "hardwareAddr"],
    );
    assert_one_error(
        "machine: {network: {interfaces: [{interface: bond0, bond: {deviceSelectors: [{}]}}]}}",
        "machine.network.interfaces[0].bond.deviceSelectors[0]",
        &["selects nothing"],
    );
    assert_one_error(
        "machine: {network: {interfaces: [{dhcp: true}]}}",
        "machine.network.interfaces[0].interface",
        &["is empty", "deviceSelector"],
    );
}

#[test]
fn extension_service_configs_are_checked() {
    let mut cfg = common::worker();
    let text = "apiVersion: v1alpha1\nkind: ExtensionServiceConfig\nname: app\nconfigFiles:\n  - {content: a, mountPath: etc/app.conf}\n  - {content: b, mountPath: /etc/../app.conf}\n  - {content: c, mountPath: /etc/app.conf}\n  - {content: d, mountPath: /etc/app.conf}\nenvironment: [NOEQUALS, A=1]\n";
    let with = kiln_config::from_yaml(&format!(
        "{}---\n{text}",
        kiln_config::to_yaml(&cfg).unwrap()
    ))
    .unwrap();
    cfg.extension_service_configs = with.extension_service_configs;
    let errors: Vec<String> = validate(&cfg, Mode::Metal)
        .errors
        .iter()
        .map(ToString::to_string)
        .collect();
    let at = |p: &str| errors.iter().filter(|e| e.starts_with(p)).count();
    assert_eq!(
        at("ExtensionServiceConfig[app].configFiles[0].mountPath"),
        1,
        "{errors:#?}"
    );
    assert_eq!(
        at("ExtensionServiceConfig[app].configFiles[1].mountPath"),
        1,
        "{errors:#?}"
    );
    assert_eq!(
        at("ExtensionServiceConfig[app].configFiles[2]"),
        0,
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e
            .starts_with("ExtensionServiceConfig[app].configFiles[3].mountPath")
            && e.contains("twice")),
        "{errors:#?}"
    );
    assert_eq!(
        at("ExtensionServiceConfig[app].environment[0]"),
        1,
        "{errors:#?}"
    );
    assert_eq!(
        at("ExtensionServiceConfig[app].environment[1]"),
        0,
        "{errors:#?}"
    );
}
