//! The pull-through mirror against an upstream registry on loopback: single-flight fetches,
//! streaming a blob to the client while the upstream still sends it, serving from the cache
//! after the upstream is gone, ns= selection, pushed images first, tag TTL, upstream
//! credentials and the request log.
#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestRegistry, bytes};
use kiln_registry_mirror::manifest::OCI_MANIFEST;
use kiln_registry_mirror::reference::Digest;
use kiln_registry_mirror::{ApiConfig, Mirror, UpstreamConfig};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// Pushes a one-layer image `name:tag` whose layer is `layer`; returns the manifest digest.
async fn push_image(url: &str, name: &str, tag: &str, layer: &[u8]) -> (Digest, Digest) {
    let config = format!(r#"{{"architecture":"amd64","os":"linux","tag":"{tag}"}}"#);
    let mut digests = Vec::new();
    for data in [config.as_bytes(), layer] {
        let d = Digest::of(data);
        let resp = http()
            .post(format!("{url}/v2/{name}/blobs/uploads/?digest={d}"))
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        digests.push(d);
    }
    let m = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digests[0].to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digests[1].to_string(), "size": layer.len()}],
    })
    .to_string();
    let resp = http()
        .put(format!("{url}/v2/{name}/manifests/{tag}"))
        .header(CONTENT_TYPE, OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    (Digest::of(m.as_bytes()), digests[1].clone())
}

fn mirror_of(specs: &[(&str, &str)], ttl: Duration) -> Mirror {
    let ups = specs
        .iter()
        .map(|(h, u)| UpstreamConfig::parse(&format!("{h}={u}")).unwrap())
        .collect();
    Mirror::new(ups, None, ttl).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_an_uncached_blob_fetch_it_once() {
    let upstream = TestRegistry::start(ApiConfig::default(), None).await;
    let layer = bytes(10, 8 << 20);
    let (_, ld) = push_image(&upstream.url, "library/big", "v1", &layer).await;
    let mirror = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(
            &[("docker.io", &upstream.url)],
            Duration::from_secs(3600),
        )),
    )
    .await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = format!("{}/v2/library/big/blobs/{ld}", mirror.url);
        tasks.push(tokio::spawn(async move {
            let resp = http().get(url).send().await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.bytes().await.unwrap()
        }));
    }
    for t in tasks {
        let body = t.await.unwrap();
        assert_eq!(body.len(), layer.len());
        assert_eq!(Digest::of(&body), ld);
    }
    let blob_path = format!("GET /v2/library/big/blobs/{ld}");
    assert_eq!(
        upstream.count(|r| r == blob_path),
        1,
        "{:?}",
        upstream.requests.lock().unwrap()
    );
    // The bodies end once the digest matched; storing (fsync, rename) follows.
    mirror.registry.mirror.as_ref().unwrap().settled(&ld).await;
    let stats = &mirror.registry.mirror.as_ref().unwrap().stats;
    assert_eq!(
        stats
            .upstream_blob_fetches
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        mirror.registry.storage.blob_size(&ld).await,
        Some(layer.len() as u64)
    );
}

/// An upstream that serves one blob over HTTP/1.1: the first `split` bytes at once, the rest
/// only when `release` fires.
async fn stalling_upstream(
    blob: Vec<u8>,
    split: usize,
    release: tokio::sync::oneshot::Receiver<()>,
) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"GET /v2/library/slow/blobs/sha256:"));
        let header = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            blob.len()
        );
        s.write_all(header.as_bytes()).await.unwrap();
        s.write_all(&blob[..split]).await.unwrap();
        let _ = release.await;
        s.write_all(&blob[split..]).await.unwrap();
        let _ = s.shutdown().await;
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_blob_streams_to_the_client_while_the_upstream_still_sends_it() {
    let blob = bytes(12, 4 << 20);
    let digest = Digest::of(&blob);
    let split = 1 << 20;
    let (release, released) = tokio::sync::oneshot::channel();
    let upstream = stalling_upstream(blob.clone(), split, released).await;
    let mirror = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(
            &[("docker.io", &upstream)],
            Duration::from_secs(3600),
        )),
    )
    .await;
    let mut resp = http()
        .get(format!("{}/v2/library/slow/blobs/{digest}", mirror.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // The upstream holds back everything after the first MiB: the client still gets that MiB.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while got.len() < split {
            let chunk = resp.chunk().await.unwrap().expect("body ended early");
            got.extend_from_slice(&chunk);
        }
    })
    .await
    .expect("the first MiB did not reach the client while the upstream stalled");
    assert_eq!(got, blob[..split]);
    let m = mirror.registry.mirror.as_ref().unwrap();
    assert_eq!(m.fetches_in_flight(), 1);
    assert_eq!(mirror.registry.storage.blob_size(&digest).await, None);

    release.send(()).unwrap();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(Digest::of(&got), digest);
    m.settled(&digest).await;
    assert_eq!(
        mirror.registry.storage.blob_size(&digest).await,
        Some(blob.len() as u64)
    );
    let timings = m.stats.fetch_timings.lock().unwrap().clone();
    assert_eq!(timings.len(), 1);
    assert!(timings[0].first_byte < timings[0].verified, "{timings:?}");
    assert_eq!(timings[0].bytes, blob.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_does_not_match_its_digest_is_never_cached() {
    let blob = bytes(13, 2 << 20);
    // The client asks for other content of the same length: the upstream's bytes are wrong.
    let digest = Digest::of(&bytes(14, 2 << 20));
    let (release, released) = tokio::sync::oneshot::channel();
    let upstream = stalling_upstream(blob.clone(), 1 << 20, released).await;
    let mirror = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(
            &[("docker.io", &upstream)],
            Duration::from_secs(3600),
        )),
    )
    .await;
    let mut resp = http()
        .get(format!("{}/v2/library/slow/blobs/{digest}", mirror.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    release.send(()).unwrap();
    // The bytes stream before the digest can be checked; with the length announced, the
    // client may get the whole wrong body and rejects it by its digest, as runtimes do. What
    // the mirror guarantees: the body never matches the digest, and nothing is cached.
    let mut got = Vec::new();
    while let Ok(Some(c)) = resp.chunk().await {
        got.extend_from_slice(&c);
    }
    assert_ne!(Digest::of(&got), digest);
    let m = mirror.registry.mirror.as_ref().unwrap();
    m.settled(&digest).await;
    assert_eq!(mirror.registry.storage.blob_size(&digest).await, None);
    assert_eq!(
        mirror.registry.storage.blob_size(&Digest::of(&blob)).await,
        None
    );
}

#[tokio::test]
async fn cached_content_is_served_after_the_upstream_is_gone() {
    let mut upstream = TestRegistry::start(ApiConfig::default(), None).await;
    let layer = bytes(11, 100_000);
    let (md, ld) = push_image(&upstream.url, "library/app", "v1", &layer).await;
    // TTL zero: every tag request tries the upstream first.
    let mirror = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(&[("docker.io", &upstream.url)], Duration::ZERO)),
    )
    .await;
    let pull = |path: String| {
        let url = format!("{}{path}", mirror.url);
        async move { http().get(url).send().await.unwrap() }
    };
    let resp = pull("/v2/library/app/manifests/v1".into()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["docker-content-digest"], md.as_str());
    assert_eq!(
        pull(format!("/v2/library/app/blobs/{ld}"))
            .await
            .bytes()
            .await
            .unwrap()
            .len(),
        layer.len()
    );

    upstream.stop().await;
    assert!(
        http()
            .get(format!("{}/v2/", upstream.url))
            .send()
            .await
            .is_err(),
        "upstream still answers"
    );

    let resp = pull("/v2/library/app/manifests/v1".into()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["docker-content-digest"], md.as_str());
    let resp = pull(format!("/v2/library/app/manifests/{md}")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = pull(format!("/v2/library/app/blobs/{ld}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(Digest::of(&body), ld);
    // What was never cached fails with an upstream error, not a hang or a 404 lie.
    let resp = pull("/v2/library/other/manifests/v1".into()).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn ns_selects_the_upstream_and_pushed_images_come_first() {
    let docker = TestRegistry::start(ApiConfig::default(), None).await;
    let ghcr = TestRegistry::start(ApiConfig::default(), None).await;
    let (from_docker, _) = push_image(&docker.url, "org/app", "v1", b"docker layer").await;
    let (from_ghcr, ghcr_layer) = push_image(&ghcr.url, "org/app", "v1", b"ghcr layer").await;
    let mirror = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(
            &[("docker.io", &docker.url), ("ghcr.io", &ghcr.url)],
            Duration::from_secs(3600),
        )),
    )
    .await;
    let digest_of = |q: &'static str| {
        let url = format!("{}/v2/org/app/manifests/v1{q}", mirror.url);
        async move {
            let r = http().get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.headers()["docker-content-digest"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(digest_of("").await, from_docker.as_str());
    assert_eq!(digest_of("?ns=docker.io").await, from_docker.as_str());
    assert_eq!(digest_of("?ns=ghcr.io").await, from_ghcr.as_str());
    let r = http()
        .get(format!(
            "{}/v2/org/app/blobs/{ghcr_layer}?ns=ghcr.io",
            mirror.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"ghcr layer");
    // An ns= that no mirror serves finds only pushed content.
    let r = http()
        .get(format!("{}/v2/org/app/manifests/v1?ns=quay.io", mirror.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Once pushed directly (host stripped from the name), the pushed image wins everywhere.
    let (pushed, _) = push_image(&mirror.url, "org/app", "v1", b"pushed layer").await;
    assert_eq!(digest_of("").await, pushed.as_str());
    assert_eq!(digest_of("?ns=ghcr.io").await, pushed.as_str());
}

#[tokio::test]
async fn tags_are_refreshed_after_the_ttl_and_digests_are_immutable() {
    let upstream = TestRegistry::start(ApiConfig::default(), None).await;
    let (old, _) = push_image(&upstream.url, "library/app", "v1", b"first").await;
    let long = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(
            &[("docker.io", &upstream.url)],
            Duration::from_secs(3600),
        )),
    )
    .await;
    let zero = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(&[("docker.io", &upstream.url)], Duration::ZERO)),
    )
    .await;
    let digest_at = |base: String| async move {
        let r = http()
            .get(format!("{base}/v2/library/app/manifests/v1"))
            .send()
            .await
            .unwrap();
        r.headers()["docker-content-digest"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(digest_at(long.url.clone()).await, old.as_str());
    assert_eq!(digest_at(zero.url.clone()).await, old.as_str());
    let (new, _) = push_image(&upstream.url, "library/app", "v1", b"second").await;
    assert_eq!(
        digest_at(long.url.clone()).await,
        old.as_str(),
        "fresh tag served from cache"
    );
    assert_eq!(
        digest_at(zero.url.clone()).await,
        new.as_str(),
        "expired tag refreshed"
    );
    // By digest, the old manifest stays available from the cache.
    let before = upstream.count(|r| r.contains("/manifests/"));
    let r = http()
        .get(format!("{}/v2/library/app/manifests/{old}", long.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(upstream.count(|r| r.contains("/manifests/")), before);
}

#[tokio::test]
async fn upstream_credentials_are_used() {
    let upstream = TestRegistry::start(
        ApiConfig {
            read_only: false,
            basic_auth: Some(("pull".into(), "secret".into())),
        },
        None,
    )
    .await;
    // Seed through the API with credentials.
    let layer = b"private layer";
    let d = Digest::of(layer);
    let r = http()
        .post(format!(
            "{}/v2/private/app/blobs/uploads/?digest={d}",
            upstream.url
        ))
        .basic_auth("pull", Some("secret"))
        .body(layer.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut up = UpstreamConfig::parse(&format!("docker.io={}", upstream.url)).unwrap();
    let without = TestRegistry::start(
        ApiConfig::default(),
        Some(Mirror::new(vec![up.clone()], None, Duration::ZERO).unwrap()),
    )
    .await;
    up.credentials = Some(("pull".into(), "secret".into()));
    let with = TestRegistry::start(
        ApiConfig::default(),
        Some(Mirror::new(vec![up], None, Duration::ZERO).unwrap()),
    )
    .await;
    let r = http()
        .get(format!("{}/v2/private/app/blobs/{d}", without.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let r = http()
        .get(format!("{}/v2/private/app/blobs/{d}", with.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), layer);
}

/// A `tracing` writer that keeps what is written.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_request_log_says_hit_or_upstream() {
    // A global subscriber: a thread-local one (`set_default`) races with the other tests of
    // this binary over tracing's per-callsite interest cache and sometimes sees nothing. The
    // other tests log here too, so the lines are told apart by this test's repository name.
    static CAPTURED: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    let captured = CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_env_filter("kiln_registry_mirror::access=info")
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            captured
        })
        .clone();
    let upstream = TestRegistry::start(ApiConfig::default(), None).await;
    let (_, ld) = push_image(&upstream.url, "library/logged", "v1", b"layer").await;
    let mirror = TestRegistry::start(
        ApiConfig::default(),
        Some(mirror_of(
            &[("docker.io", &upstream.url)],
            Duration::from_secs(3600),
        )),
    )
    .await;
    for _ in 0..2 {
        let r = http()
            .get(format!("{}/v2/library/logged/manifests/v1", mirror.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = http()
            .get(format!("{}/v2/library/logged/blobs/{ld}", mirror.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"layer");
    }
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    // Only the mirror's lines (the upstream, in this process too, logs its own local pulls).
    let pulls: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("pull ")
                && l.contains("library/logged")
                && l.contains("upstream=\"docker.io\"")
        })
        .collect();
    assert_eq!(pulls.len(), 4, "{log}");
    assert!(
        pulls[0].contains("pull manifest library/logged:v1 upstream"),
        "{log}"
    );
    assert!(
        pulls[1].contains(&format!("pull blob library/logged@{ld} upstream")),
        "{log}"
    );
    assert!(
        pulls[2].contains("pull manifest library/logged:v1 hit"),
        "{log}"
    );
    assert!(
        pulls[3].contains(&format!("pull blob library/logged@{ld} hit")),
        "{log}"
    );
}
