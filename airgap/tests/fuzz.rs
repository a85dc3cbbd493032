//! Bounded fuzzing (proptest; `KILN_FUZZ_CASES` cases, 64 by default) of the proxy's request
//! handling and the DNS server's packet handling: random and mangled input never crashes
//! either, the proxy always answers a 4xx (or nothing for an empty request), and the DNS
//! server still answers a good query afterwards.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_airgap::allow::AllowList;
use kiln_airgap::audit::{self, AuditLog, Decision};
use kiln_airgap::lab::ClusterNames;
use kiln_airgap::proxy::{Limits, Proxy};
use proptest::prelude::*;
use proptest::strategy::ValueTree as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Feeds `input` to one proxy connection and returns what the proxy answered.
async fn proxy_answer(proxy: Arc<Proxy>, input: Vec<u8>) -> Vec<u8> {
    let (mut client, server) = tokio::io::duplex(16 * 1024);
    let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let handler = tokio::spawn(async move { proxy.handle_connection(server, peer).await });
    let (mut r, mut w) = tokio::io::split(&mut client);
    let write = async move {
        let _ = w.write_all(&input).await;
        let _ = w.shutdown().await;
    };
    let mut out = Vec::new();
    let read = r.read_to_end(&mut out);
    let ((), _) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .expect("the proxy answered within 20 s");
    handler.await.expect("the connection handler did not panic");
    out
}

fn request_like() -> impl Strategy<Value = Vec<u8>> {
    let method = prop_oneof![
        Just("GET".to_owned()),
        Just("CONNECT".to_owned()),
        Just("POST".to_owned()),
        "[A-Z]{0,12}",
        ".{0,8}",
    ];
    let target = prop_oneof![
        "http://[a-z0-9.]{1,20}(:[0-9]{1,6})?/[ -~]{0,30}",
        "[a-z0-9.]{1,20}:[0-9]{1,6}",
        "\\[[0-9a-f:]{0,20}\\]:[0-9]{0,6}",
        "[ -~]{0,40}",
    ];
    let version = prop_oneof![
        Just("HTTP/1.1".to_owned()),
        Just("HTTP/1.0".to_owned()),
        "[ -~]{0,10}"
    ];
    let headers = prop::collection::vec(("[!-9;-~]{0,20}", "[ -~]{0,200}"), 0..20);
    (method, target, version, headers, any::<bool>()).prop_map(|(m, t, v, h, end)| {
        let mut s = format!("{m} {t} {v}\r\n");
        for (n, val) in h {
            s.push_str(&format!("{n}: {val}\r\n"));
        }
        if end {
            s.push_str("\r\n");
        }
        s.into_bytes()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn proxy_answers_4xx_to_anything_it_cannot_serve(
        input in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..4096),
            request_like(),
        ]
    ) {
        let rt = runtime();
        // One name the generator cannot produce (it makes no '-') is allowed, and no network
        // rule: every target is denied by name, nothing is resolved or reached.
        let allow = AllowList(vec!["lab-registry.internal:443".parse().expect("rule")]);
        let proxy = Arc::new(Proxy::new(allow, AuditLog::discard(), Limits::default()));
        let out = rt.block_on(proxy_answer(proxy, input.clone()));
        let text = String::from_utf8_lossy(&out);
        prop_assert!(
            out.is_empty() && input.is_empty()
                || text.starts_with("HTTP/1.1 4")
                || text.starts_with("HTTP/1.1 502"),
            "input {:?} got {:?}", String::from_utf8_lossy(&input), text
        );
    }

    #[test]
    fn huge_headers_get_431(extra in 16usize * 1024..64 * 1024, lines in 1usize..300) {
        let rt = runtime();
        let proxy = Arc::new(Proxy::new(AllowList::default(), AuditLog::discard(), Limits::default()));
        let per = extra / lines;
        let mut req = String::from("GET http://registry.lab/ HTTP/1.1\r\n");
        for i in 0..lines {
            req.push_str(&format!("X-{i}: {}\r\n", "v".repeat(per)));
        }
        req.push_str("\r\n");
        let out = rt.block_on(proxy_answer(proxy, req.into_bytes()));
        prop_assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn connect_outside_the_allowed_ports_is_denied_and_audited(port in 1u16..=65535) {
        prop_assume!(port != 443);
        let rt = runtime();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(audit::AUDIT_FILE);
        let allow = AllowList(vec!["registry.lab:443".parse().expect("rule")]);
        let log = AuditLog::open(&path).expect("audit");
        let proxy = Arc::new(Proxy::new(allow, log, Limits::default()));
        let req = format!("CONNECT registry.lab:{port} HTTP/1.1\r\nHost: registry.lab:{port}\r\n\r\n");
        let out = rt.block_on(proxy_answer(proxy, req.into_bytes()));
        prop_assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 403 "));
        let events = audit::read(&path).expect("read audit");
        prop_assert_eq!(events.len(), 1);
        prop_assert_eq!(events[0].decision, Decision::Denied);
        prop_assert_eq!(&events[0].destination, &format!("registry.lab:{port}"));
    }
}

/// A well-formed query for `name` A with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn dns_survives_random_and_mangled_packets() -> anyhow::Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let names = ClusterNames::new("kiln-default", "10.5.0.1".parse()?, "10.5.0.0/24".parse()?);
        let dns = common::start_dns(names.dns_config(true), AuditLog::discard()).await?;
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        sock.connect(dns.addr).await?;
        let good = query(0x4242, "kiln-default.kiln.internal");
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: cases(),
            ..ProptestConfig::default()
        });
        let strategy = prop_oneof![
            prop::collection::vec(any::<u8>(), 0..600),
            (
                prop::collection::vec((0usize..40, any::<u8>()), 1..8),
                0usize..40
            )
                .prop_map({
                    let good = good.clone();
                    move |(flips, cut)| {
                        let mut p = good.clone();
                        for (i, b) in flips {
                            if let Some(x) = p.get_mut(i) {
                                *x = b;
                            }
                        }
                        p.truncate(p.len().saturating_sub(cut % 8));
                        p
                    }
                }),
        ];
        let mut packets = Vec::new();
        for _ in 0..cases() {
            packets.push(
                strategy
                    .new_tree(&mut runner)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .current(),
            );
        }
        for p in &packets {
            sock.send(p).await?;
        }
        // Also over TCP, one connection per packet.
        for p in packets.iter().take(32) {
            let mut s = tokio::net::TcpStream::connect(dns.addr).await?;
            let mut framed = (p.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(p);
            let _ = s.write_all(&framed).await;
            drop(s);
        }
        // Still serving: a good query gets its answer. It goes out from a socket of its own:
        // answers to the junk (a random packet may carry any id, this query's too) all go to
        // the first socket.
        let check = query(0x7e57, "kiln-default.kiln.internal");
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        sock.connect(dns.addr).await?;
        sock.send(&check).await?;
        let mut buf = [0u8; 1500];
        let answered = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = sock.recv(&mut buf).await?;
                if n >= 12 && buf[..2] == [0x7e, 0x57] && buf[2] & 0x80 != 0 {
                    // rcode, and the answer count must be 1.
                    return Ok::<_, std::io::Error>((buf[3] & 0x0f, buf[7]));
                }
            }
        })
        .await??;
        anyhow::ensure!(
            answered == (0, 1),
            "(rcode, answers) {answered:?} for a lab name"
        );
        dns.stop().await;
        Ok(())
    })
}

/// The UDP readers' own rules, one packet each: a header with a broken body gets FORMERR with
/// its id, a message marked as a response gets no answer at all (no reflection), and an answer
/// that does not fit the client's 512 bytes is never sent longer.
#[test]
fn dns_udp_readers_answer_formerr_ignore_responses_and_keep_to_512_bytes() -> anyhow::Result<()> {
    let rt = runtime();
    rt.block_on(async {
        let names = ClusterNames::new("kiln-default", "10.5.0.1".parse()?, "10.5.0.0/24".parse()?);
        let dns = common::start_dns(names.dns_config(true), AuditLog::discard()).await?;
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        sock.connect(dns.addr).await?;
        let mut buf = [0u8; 4096];
        let recv = async |sock: &tokio::net::UdpSocket, buf: &mut [u8]| {
            tokio::time::timeout(Duration::from_secs(2), sock.recv(buf)).await
        };

        // A header that claims one question, then garbage.
        let mut broken = query(0x1111, "kiln-default.kiln.internal");
        broken.truncate(15);
        sock.send(&broken).await?;
        let n = recv(&sock, &mut buf).await??;
        anyhow::ensure!(
            n >= 12 && buf[..2] == [0x11, 0x11],
            "answer {:?}",
            &buf[..n]
        );
        anyhow::ensure!(buf[2] & 0x80 != 0, "not a response: {:?}", &buf[..n]);
        anyhow::ensure!(buf[3] & 0x0f == 1, "rcode {} is not FORMERR", buf[3] & 0x0f);

        // The same query with QR set: silence.
        let mut response = query(0x2222, "kiln-default.kiln.internal");
        response[2] |= 0x80;
        sock.send(&response).await?;
        anyhow::ensure!(
            recv(&sock, &mut buf).await.is_err(),
            "a response packet was answered"
        );

        // A good query still gets its one answer, within 512 bytes (no EDNS).
        sock.send(&query(0x3333, "kiln-default.kiln.internal"))
            .await?;
        let n = recv(&sock, &mut buf).await??;
        anyhow::ensure!(buf[..2] == [0x33, 0x33] && buf[3] & 0x0f == 0 && buf[7] == 1);
        anyhow::ensure!(n <= 512, "{n} bytes without EDNS");
        dns.stop().await;
        Ok(())
    })
}
