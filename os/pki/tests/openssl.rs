//! Certificates Kiln makes verify with an independent implementation (`openssl verify`), and a
//! kubeadm PKI directory made by `openssl` imports and keeps working as a CA.

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

use std::path::Path;
use std::process::Command;

use kiln_pki::{CertificateAuthority, KeyAlgorithm, LeafRequest, ROLE_ADMIN, SecretsBundle, Usage};

fn have_openssl() -> bool {
    kiln_test_tiers::check(module_path!(), &[kiln_test_tiers::Tier::Openssl])
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?} failed:\n{text}");
    text
}

fn verify(dir: &Path, ca: &str, leaf: &str, purpose: &str) {
    std::fs::write(dir.join("verify-ca.crt"), ca).unwrap();
    std::fs::write(dir.join("verify-leaf.crt"), leaf).unwrap();
    let out = openssl(
        dir,
        &[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            "verify-ca.crt",
            "verify-leaf.crt",
        ],
    );
    assert!(out.contains("verify-leaf.crt: OK"), "{out}");
}

#[test]
fn generated_certificates_verify_with_openssl() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = SecretsBundle::generate().unwrap();
    for ca in [
        bundle.os_ca().unwrap(),
        bundle.kubernetes_ca().unwrap(),
        bundle.etcd_ca().unwrap(),
    ] {
        // Self-signed CA verifies against itself and is marked as a CA.
        verify(dir.path(), ca.cert_pem(), ca.cert_pem(), "any");
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        let text = openssl(dir.path(), &["x509", "-in", "ca.crt", "-noout", "-text"]);
        assert!(text.contains("CA:TRUE"), "{text}");
    }

    let os = bundle.os_ca().unwrap();
    let admin = os.issue(&LeafRequest::client("admin", ROLE_ADMIN)).unwrap();
    verify(dir.path(), os.cert_pem(), &admin.cert_pem, "sslclient");
    std::fs::write(dir.path().join("admin.crt"), &admin.cert_pem).unwrap();
    let subject = openssl(
        dir.path(),
        &["x509", "-in", "admin.crt", "-noout", "-subject"],
    );
    assert!(subject.contains("O = os:admin"), "{subject}");

    let etcd = bundle.etcd_ca().unwrap();
    let peer = etcd
        .issue(&LeafRequest {
            common_name: "cp-1".into(),
            organizations: vec![],
            dns_names: vec!["cp-1".into(), "localhost".into()],
            ip_addresses: vec!["10.5.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()],
            usage: Usage::ServerAndClient,
            validity: time::Duration::days(365),
            algorithm: KeyAlgorithm::EcdsaP256,
        })
        .unwrap();
    verify(dir.path(), etcd.cert_pem(), &peer.cert_pem, "sslserver");
    verify(dir.path(), etcd.cert_pem(), &peer.cert_pem, "sslclient");
    std::fs::write(dir.path().join("peer.crt"), &peer.cert_pem).unwrap();
    let text = openssl(
        dir.path(),
        &[
            "x509",
            "-in",
            "peer.crt",
            "-noout",
            "-ext",
            "subjectAltName",
        ],
    );
    assert!(
        text.contains("IP Address:10.5.0.2") && text.contains("DNS:cp-1"),
        "{text}"
    );

    // A leaf from another CA must not verify: the check above can fail.
    let other = CertificateAuthority::generate(
        "other",
        None,
        KeyAlgorithm::EcdsaP256,
        time::Duration::days(1),
    )
    .unwrap();
    std::fs::write(dir.path().join("other.crt"), other.cert_pem()).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile", "other.crt", "admin.crt"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Writes a kubeadm-like PKI directory with `tests/data/make-kubeadm-pki.sh`.
fn make_kubeadm_pki(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/make-kubeadm-pki.sh");
    let out = Command::new(script).arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const TOKEN: &str = "abcdef.0123456789abcdef";

#[test]
fn kubeadm_pki_imports_and_still_signs() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    make_kubeadm_pki(&pki);
    assert!(
        std::fs::read_to_string(pki.join("ca.key"))
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    assert!(
        std::fs::read_to_string(pki.join("etcd/ca.key"))
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );

    let bundle = SecretsBundle::from_kubernetes_pki(&pki, TOKEN).unwrap();
    assert_eq!(bundle.secrets.bootstraptoken, TOKEN);
    let read = |f: &str| std::fs::read_to_string(pki.join(f)).unwrap();
    assert_eq!(bundle.certs.k8s.cert_pem().unwrap(), read("ca.crt"));
    assert_eq!(
        bundle.certs.k8saggregator.cert_pem().unwrap(),
        read("front-proxy-ca.crt")
    );
    assert_eq!(bundle.certs.etcd.cert_pem().unwrap(), read("etcd/ca.crt"));
    assert_eq!(
        bundle.certs.k8sserviceaccount.key_pem().unwrap(),
        read("sa.key")
    );
    SecretsBundle::from_yaml(&bundle.to_yaml().unwrap()).unwrap();

    // The imported CAs issue certificates that openssl accepts against the original files.
    for (ca, file) in [
        (bundle.kubernetes_ca().unwrap(), "ca.crt"),
        (bundle.etcd_ca().unwrap(), "etcd/ca.crt"),
    ] {
        let leaf = ca
            .issue(&LeafRequest::client(
                "kube-apiserver-etcd-client",
                "system:masters",
            ))
            .unwrap();
        verify(dir.path(), &read(file), &leaf.cert_pem, "sslclient");
    }
}

#[test]
fn kubeadm_import_errors_are_clear() {
    if !have_openssl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    make_kubeadm_pki(&pki);

    std::fs::rename(pki.join("front-proxy-ca.key"), dir.path().join("moved.key")).unwrap();
    let err = SecretsBundle::from_kubernetes_pki(&pki, TOKEN)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("front-proxy-ca.key") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("/etc/kubernetes/pki"), "{err}");

    // A key that belongs to another certificate.
    std::fs::copy(pki.join("ca.key"), pki.join("front-proxy-ca.key")).unwrap();
    let err = SecretsBundle::from_kubernetes_pki(&pki, TOKEN)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("front-proxy-ca.crt") && err.contains("does not match"),
        "{err}"
    );
    std::fs::rename(dir.path().join("moved.key"), pki.join("front-proxy-ca.key")).unwrap();

    // sa.pub from another key.
    openssl(
        &pki,
        &["genrsa", "-traditional", "-out", "other.key", "2048"],
    );
    openssl(
        &pki,
        &["rsa", "-in", "other.key", "-pubout", "-out", "sa.pub"],
    );
    let err = SecretsBundle::from_kubernetes_pki(&pki, TOKEN)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sa.pub is not the public key"), "{err}");

    let err = SecretsBundle::from_kubernetes_pki(&pki, "not-a-token")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--kubernetes-bootstrap-token") && err.contains("kubeadm token create"),
        "{err}"
    );
}
