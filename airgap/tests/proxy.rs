//! The egress proxy against `curl`: plain HTTP, `CONNECT`, and both again over TLS to the
//! proxy, to an allowed origin on loopback and to a denied one, with the audit lines checked
//! one by one; plus oversized and malformed requests.

mod common;

use kiln_airgap::audit::{self, AuditLog, Decision, Source};
use kiln_airgap::tls;
use kiln_test_tiers::Tier;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `curl -s` with `args`; returns (status code, body). The status is the origin's, or, when the
/// proxy refused a `CONNECT`, the proxy's answer to it.
async fn curl(args: &[String], url: &str) -> anyhow::Result<(u16, String)> {
    let mut a: Vec<String> = vec![
        "-s".into(),
        "--max-time".into(),
        "10".into(),
        "-w".into(),
        "\n%{http_code} %{http_connect}".into(),
    ];
    a.extend(args.iter().cloned());
    a.push(url.to_owned());
    let out = common::run("curl", &a, true).await?;
    let (body, codes) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
    let mut codes = codes
        .split_whitespace()
        .map(|c| c.parse::<u16>().unwrap_or(0));
    let (code, connect) = (codes.next().unwrap_or(0), codes.next().unwrap_or(0));
    let code = if code == 0 { connect } else { code };
    Ok((code, body.to_owned()))
}

#[tokio::test]
async fn curl_through_http_and_https_proxies_reaches_allowed_and_is_refused_denied()
-> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Proxy);
    let dir = tempfile::tempdir()?;
    let audit_path = dir.path().join(audit::AUDIT_FILE);
    let allowed = common::start_origin().await?;
    let denied = common::start_origin().await?;
    let rules = [
        format!("127.0.0.1:{}", allowed.addr.port()),
        format!("localhost:{}", allowed.addr.port()),
    ];
    let rules: Vec<&str> = rules.iter().map(String::as_str).collect();
    let log = AuditLog::open(&audit_path)?;
    let http_proxy = common::start_proxy(&rules, log.clone(), None).await?;
    let pair = tls::self_signed(&["127.0.0.1".into()])?;
    let ca = dir.path().join("proxy-ca.pem");
    std::fs::write(&ca, &pair.cert_pem)?;
    let https_proxy =
        common::start_proxy(&rules, log, Some(tls::acceptor_from_pem(&pair)?)).await?;

    let proxies = [
        vec!["-x".to_owned(), format!("http://{}", http_proxy.addr)],
        vec![
            "-x".to_owned(),
            format!("https://{}", https_proxy.addr),
            "--proxy-cacert".to_owned(),
            ca.display().to_string(),
        ],
    ];
    let mut expected = Vec::new();
    for proxy in &proxies {
        for tunnel in [false, true] {
            let mut args = proxy.clone();
            if tunnel {
                args.push("-p".into());
            }
            let method = if tunnel { "CONNECT" } else { "GET" };
            let ok_url = format!("http://{}/ok", allowed.addr);
            let (code, body) = curl(&args, &ok_url).await?;
            assert_eq!(code, 200, "{method} via {proxy:?}: {body}");
            assert_eq!(body, format!("hello from origin {}\n", allowed.addr.port()));
            expected.push((method, allowed.addr.to_string(), Decision::Allowed));

            let bad_url = format!("http://{}/no", denied.addr);
            let (code, body) = curl(&args, &bad_url).await?;
            assert_eq!(code, 403, "{method} via {proxy:?}: {body}");
            if !tunnel {
                assert!(body.contains("not on the allow list"), "{body}");
            }
            expected.push((method, denied.addr.to_string(), Decision::Denied));
        }
    }
    // Allowed by host name.
    let (code, _) = curl(
        &proxies[0],
        &format!("http://localhost:{}/by-name", allowed.addr.port()),
    )
    .await?;
    assert_eq!(code, 200);
    expected.push((
        "GET",
        format!("localhost:{}", allowed.addr.port()),
        Decision::Allowed,
    ));

    http_proxy.stop().await;
    https_proxy.stop().await;
    let events = audit::read(&audit_path)?;
    let got: Vec<(&str, String, Decision)> = events
        .iter()
        .map(|e| (e.method.as_str(), e.destination.clone(), e.decision))
        .collect();
    assert_eq!(got, expected);
    for e in &events {
        assert_eq!(e.source, Source::Proxy);
        assert!(e.client.starts_with("127.0.0.1:"), "{e:?}");
        if e.allowed {
            assert!(e.bytes_sent > 0 && e.bytes_received > 0, "{e:?}");
            assert!(e.reason.is_none(), "{e:?}");
        } else {
            assert_eq!((e.bytes_sent, e.bytes_received), (0, 0), "{e:?}");
        }
    }
    allowed.stop().await;
    denied.stop().await;
    Ok(())
}

#[tokio::test]
async fn oversized_and_malformed_requests_get_4xx_and_an_audit_line() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Proxy);
    let dir = tempfile::tempdir()?;
    let audit_path = dir.path().join(audit::AUDIT_FILE);
    let origin = common::start_origin().await?;
    let rule = format!("127.0.0.1:{}", origin.addr.port());
    let proxy = common::start_proxy(&[rule.as_str()], AuditLog::open(&audit_path)?, None).await?;
    let (code, _) = curl(
        &[
            "-x".into(),
            format!("http://{}", proxy.addr),
            "-H".into(),
            format!("X-Big: {}", "a".repeat(64 * 1024)),
        ],
        &format!("http://{}/", origin.addr),
    )
    .await?;
    assert_eq!(code, 431);
    for raw in [
        &b"NOT A REQUEST\r\n\r\n"[..],
        b"GET /origin-form HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT nohostport HTTP/1.1\r\n\r\n",
        b"GET http://[::1 HTTP/1.1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await?;
        s.write_all(raw).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        assert!(out.starts_with("HTTP/1.1 400 "), "{raw:?} -> {out}");
    }
    proxy.stop().await;
    origin.stop().await;
    let events = audit::read(&audit_path)?;
    assert_eq!(events.len(), 5, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e.decision == Decision::Malformed && !e.allowed)
    );
    Ok(())
}

#[tokio::test]
async fn names_are_resolved_for_network_rules_only_when_allowed_to() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Proxy);
    let origin = common::start_origin().await?;
    let url = format!("http://localhost:{}/", origin.addr.port());
    let rule: kiln_airgap::allow::Rule = format!("127.0.0.0/8:{}", origin.addr.port()).parse()?;
    for (resolve, want) in [(true, 200), (false, 403)] {
        let listener = kiln_airgap::proxy::bind("127.0.0.1:0".parse()?).await?;
        let addr = listener.local_addr()?;
        let proxy = std::sync::Arc::new(
            kiln_airgap::proxy::Proxy::new(
                kiln_airgap::allow::AllowList(vec![rule.clone()]),
                AuditLog::discard(),
                kiln_airgap::proxy::Limits::default(),
            )
            .resolve_for_networks(resolve),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kiln_airgap::proxy::serve(listener, None, proxy, async {
            let _ = rx.await;
        }));
        let (code, body) = curl(&["-x".into(), format!("http://{addr}")], &url).await?;
        assert_eq!(code, want, "resolve_for_networks={resolve}: {body}");
        let _ = tx.send(());
        task.await?;
    }
    origin.stop().await;
    Ok(())
}
