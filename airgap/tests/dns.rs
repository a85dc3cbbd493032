//! The lab DNS against real clients and peers: `dig` over UDP and TCP for the cluster's names,
//! REFUSED and audited outside names in air-gapped mode, and forwarding to an `unbound` the
//! test starts on loopback with its own zone (never an outside resolver).

mod common;

use std::net::IpAddr;

use kiln_airgap::audit::{self, AuditLog, Decision, Source};
use kiln_airgap::lab::ClusterNames;
use kiln_test_tiers::Tier;

use common::{dig, dig_status};

fn names() -> ClusterNames {
    let mut n = ClusterNames::new(
        "kiln-default",
        "10.5.0.1".parse().expect("address"),
        "10.5.0.0/24".parse().expect("address"),
    );
    for (i, role) in ["controlplane-1", "controlplane-2", "worker-1"]
        .iter()
        .enumerate()
    {
        n.nodes.push((
            format!("kiln-default-{role}"),
            format!("10.5.0.{}", i + 2).parse().expect("address"),
        ));
    }
    n.nodes.push((
        "kiln-default-worker-1".into(),
        "fd00:5::4".parse().expect("address"),
    ));
    n.registry = Some("10.5.0.1".parse().expect("address"));
    n
}

#[tokio::test]
async fn dig_resolves_lab_names_and_airgapped_mode_refuses_and_audits_the_rest()
-> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Dns);
    let dir = tempfile::tempdir()?;
    let audit_path = dir.path().join(audit::AUDIT_FILE);
    let names = names();
    let dns = common::start_dns(names.dns_config(true), AuditLog::open(&audit_path)?).await?;

    for proto in ["+notcp", "+tcp"] {
        for (name, want) in [
            ("kiln-default-controlplane-1.kiln.internal", "10.5.0.2"),
            ("kiln-default-controlplane-2.kiln.internal", "10.5.0.3"),
            ("kiln-default-worker-1.kiln.internal", "10.5.0.4"),
            ("kiln-default-worker-1", "10.5.0.4"),
            (names.endpoint_name().as_str(), "10.5.0.1"),
            (names.registry_name().as_str(), "10.5.0.1"),
        ] {
            let out = dig(dns.addr, &[proto, "+short", name, "A"]).await?;
            assert_eq!(out.trim(), want, "{name} A over {proto}");
        }
        let out = dig(
            dns.addr,
            &[
                proto,
                "+short",
                "kiln-default-worker-1.kiln.internal",
                "AAAA",
            ],
        )
        .await?;
        assert_eq!(
            out.trim().parse::<IpAddr>()?,
            "fd00:5::4".parse::<IpAddr>()?
        );
        let out = dig(dns.addr, &[proto, "nobody.kiln.internal", "A"]).await?;
        assert_eq!(dig_status(&out).as_deref(), Some("NXDOMAIN"), "{out}");
        let out = dig(dns.addr, &[proto, "example.com", "A"]).await?;
        assert_eq!(dig_status(&out).as_deref(), Some("REFUSED"), "{out}");
    }
    // An authoritative answer for a lab name.
    let out = dig(dns.addr, &["kiln-default.kiln.internal", "A"]).await?;
    assert!(out.contains(" aa"), "lab answers are authoritative: {out}");
    dns.stop().await;

    let events = audit::read(&audit_path)?;
    let refused: Vec<_> = events
        .iter()
        .filter(|e| e.source == Source::Dns && e.decision == Decision::Denied)
        .collect();
    assert_eq!(refused.len(), 2, "one refusal per transport: {events:?}");
    for e in &refused {
        assert_eq!(e.destination, "example.com.");
        assert_eq!(e.method, "A");
        assert!(!e.allowed);
        assert!(e.client.starts_with("127.0.0.1:"));
    }
    assert_eq!(events.len(), 2, "lab names are not egress: {events:?}");
    Ok(())
}

#[tokio::test]
async fn outside_names_are_forwarded_to_a_local_unbound_and_audited() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Dns);
    let dir = tempfile::tempdir()?;
    let unbound = common::Unbound::start(dir.path(), &[]).await?;
    let audit_path = dir.path().join(audit::AUDIT_FILE);
    let mut config = names().dns_config(false);
    config.upstreams = vec![unbound.addr.to_string()];
    let dns = common::start_dns(config, AuditLog::open(&audit_path)?).await?;

    for proto in ["+notcp", "+tcp"] {
        let out = dig(dns.addr, &[proto, "+short", "www.outside.test", "A"]).await?;
        assert_eq!(out.trim(), "192.0.2.7", "forwarded A over {proto}");
        let out = dig(dns.addr, &[proto, "+short", "www.outside.test", "AAAA"]).await?;
        assert_eq!(out.trim(), "2001:db8::7", "forwarded AAAA over {proto}");
        let out = dig(dns.addr, &[proto, "missing.outside.test", "A"]).await?;
        assert_eq!(dig_status(&out).as_deref(), Some("NXDOMAIN"), "{out}");
        // Lab names are still answered here, not forwarded.
        let out = dig(dns.addr, &[proto, "+short", "kiln-default.kiln.internal"]).await?;
        assert_eq!(out.trim(), "10.5.0.1");
    }
    dns.stop().await;
    unbound.stop().await;

    let events = audit::read(&audit_path)?;
    assert_eq!(events.len(), 6, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e.allowed && e.decision == Decision::Allowed)
    );
    assert!(
        events
            .iter()
            .all(|e| e.destination.ends_with("outside.test."))
    );
    assert!(
        events
            .iter()
            .all(|e| e.bytes_sent > 0 && e.bytes_received > 0)
    );
    Ok(())
}

#[tokio::test]
async fn a_dead_upstream_gives_servfail_and_an_audited_reason() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Dns);
    let dir = tempfile::tempdir()?;
    let audit_path = dir.path().join(audit::AUDIT_FILE);
    let mut config = names().dns_config(false);
    // A bound UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0")?;
    config.upstreams = vec![silent.local_addr()?.to_string()];
    let dns = common::start_dns(config, AuditLog::open(&audit_path)?).await?;
    let out = dig(dns.addr, &["+time=5", "www.outside.test", "A"]).await?;
    assert_eq!(dig_status(&out).as_deref(), Some("SERVFAIL"), "{out}");
    dns.stop().await;
    let events = audit::read(&audit_path)?;
    assert_eq!(events.len(), 1);
    assert!(
        events[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no upstream answered")),
        "{events:?}"
    );
    Ok(())
}
