//! The distribution API over real HTTP: pushes (monolithic, chunked, resumed, broken), pulls
//! with the right headers and ranges, manifests, tags, catalog, deletes, mounts, errors,
//! basic auth, read-only mode and HTTPS.
#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use std::io::Write as _;
use std::time::Duration;

use common::{TestRegistry, bytes};
use kiln_registry_mirror::ApiConfig;
use kiln_registry_mirror::manifest::{DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use kiln_registry_mirror::reference::Digest;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    v["errors"][0]["code"].as_str().unwrap().to_owned()
}

async fn push_blob(url: &str, name: &str, data: &[u8]) -> Digest {
    let d = Digest::of(data);
    let resp = http()
        .post(format!("{url}/v2/{name}/blobs/uploads/?digest={d}"))
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    d
}

fn image_manifest(
    media_type: &str,
    config: &Digest,
    config_len: usize,
    layers: &[(Digest, usize)],
) -> String {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.to_string(), "size": config_len},
        "layers": layers.iter().map(|(d, n)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n})).collect::<Vec<_>>(),
    })
    .to_string()
}

#[tokio::test]
async fn base_endpoint_and_api_version() {
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let resp = http().get(format!("{}/v2/", reg.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test]
async fn chunked_push_with_ranges_then_pull_with_headers_and_range() {
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let url = &reg.url;
    let data = bytes(1, 300_000);
    let d = Digest::of(&data);
    let resp = http()
        .post(format!("{url}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let loc = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    assert!(resp.headers().contains_key("docker-upload-uuid"));
    let resp = http()
        .patch(format!("{url}{loc}"))
        .header(CONTENT_RANGE, "0-99999")
        .body(data[..100_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()[RANGE], "0-99999");
    let loc = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    // A chunk that does not continue where the session ends is refused with 416.
    let resp = http()
        .patch(format!("{url}{loc}"))
        .header(CONTENT_RANGE, "5-10")
        .body(vec![0u8; 6])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(resp.headers()[RANGE], "0-99999");
    let resp = http()
        .patch(format!("{url}{loc}"))
        .header(CONTENT_RANGE, "100000-199999")
        .body(data[100_000..200_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    // Not visible before the PUT.
    let resp = http()
        .head(format!("{url}/v2/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // The last chunk travels with the PUT.
    let resp = http()
        .put(format!("{url}{loc}?digest={d}"))
        .body(data[200_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
    assert_eq!(
        resp.headers()[LOCATION],
        format!("/v2/app/blobs/{d}").as_str()
    );

    let resp = http()
        .head(format!("{url}/v2/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_LENGTH], "300000");
    assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
    let body = http()
        .get(format!("{url}/v2/app/blobs/{d}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], &data[..]);
    let resp = http()
        .get(format!("{url}/v2/app/blobs/{d}"))
        .header(RANGE, "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()[CONTENT_RANGE], "bytes 1000-1999/300000");
    assert_eq!(&resp.bytes().await.unwrap()[..], &data[1000..2000]);
    let resp = http()
        .get(format!("{url}/v2/app/blobs/{d}"))
        .header(RANGE, "bytes=400000-")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    // Another repository does not see the blob until it is mounted.
    let resp = http()
        .get(format!("{url}/v2/other/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "BLOB_UNKNOWN");
    let resp = http()
        .post(format!("{url}/v2/other/blobs/uploads/?mount={d}&from=app"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let resp = http()
        .head(format!("{url}/v2/other/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // A mount from a repository without the blob starts an ordinary upload.
    let resp = http()
        .post(format!(
            "{url}/v2/third/blobs/uploads/?mount={d}&from=nothing"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    // Delete unlinks.
    let resp = http()
        .delete(format!("{url}/v2/other/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = http()
        .head(format!("{url}/v2/other/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn connection_cut_mid_patch_leaves_nothing_visible_and_the_session_resumes() {
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let url = &reg.url;
    let data = bytes(2, 200_000);
    let d = Digest::of(&data);
    let resp = http()
        .post(format!("{url}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    let resp = http()
        .patch(format!("{url}{loc}"))
        .header(CONTENT_RANGE, "0-49999")
        .body(data[..50_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);

    // A PATCH that announces 150000 bytes, sends 70000 and drops the connection.
    let addr = reg.addr;
    let loc2 = loc.clone();
    let part = data[50_000..120_000].to_vec();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "PATCH {loc2} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: 150000\r\n\r\n"
        )
        .unwrap();
        s.write_all(&part).unwrap();
        s.flush().unwrap();
        s.shutdown(std::net::Shutdown::Both).unwrap();
    })
    .await
    .unwrap();

    // Wait until the server has finished with the broken PATCH (its handler answered).
    let handled = common::wait_until(Duration::from_secs(10), || async {
        reg.count(|r| r.starts_with("done PATCH")) == 2
    })
    .await;
    assert!(handled, "the broken PATCH was not handled");
    assert_eq!(
        reg.count(|r| r.starts_with("done PATCH") && r.ends_with(" 400")),
        1
    );
    // The broken chunk is cut away: the session is back at 50000 bytes, nothing is visible.
    let r = http().get(format!("{url}{loc}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()[RANGE], "0-49999");
    let resp = http()
        .head(format!("{url}/v2/app/blobs/{d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(reg.registry.storage.blob_size(&d).await.is_none());

    // Resume from the reported end and finish.
    let resp = http()
        .patch(format!("{url}{loc}"))
        .header(CONTENT_RANGE, "50000-199999")
        .body(data[50_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = http()
        .put(format!("{url}{loc}?digest={d}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body = http()
        .get(format!("{url}/v2/app/blobs/{d}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], &data[..]);
}

#[tokio::test]
async fn wrong_digest_at_put_is_rejected_and_the_session_removed() {
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let url = &reg.url;
    let data = bytes(3, 10_000);
    let claimed = Digest::of(b"something else");
    let resp = http()
        .post(format!("{url}/v2/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let loc = resp.headers()[LOCATION].to_str().unwrap().to_owned();
    let resp = http()
        .put(format!("{url}{loc}?digest={claimed}"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");
    for d in [&claimed, &Digest::of(&data)] {
        let resp = http()
            .head(format!("{url}/v2/app/blobs/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(reg.registry.storage.blob_size(d).await.is_none());
    }
    let resp = http().get(format!("{url}{loc}")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(resp).await, "BLOB_UPLOAD_UNKNOWN");
    // Monolithic with a wrong digest: same.
    let resp = http()
        .post(format!("{url}/v2/app/blobs/uploads/?digest={claimed}"))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");
    assert!(reg.registry.storage.blob_size(&claimed).await.is_none());
}

#[tokio::test]
async fn manifests_index_tags_catalog_and_deletes() {
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let url = &reg.url;
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let cd = push_blob(url, "lib/app", config).await;
    let layer = bytes(4, 5000);
    let ld = push_blob(url, "lib/app", &layer).await;

    // A manifest that refers to a blob never pushed is refused.
    let missing = Digest::of(b"missing");
    let bad = image_manifest(OCI_MANIFEST, &cd, config.len(), &[(missing, 1)]);
    let resp = http()
        .put(format!("{url}/v2/lib/app/manifests/v1"))
        .header(CONTENT_TYPE, OCI_MANIFEST)
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "MANIFEST_BLOB_UNKNOWN");
    let resp = http()
        .put(format!("{url}/v2/lib/app/manifests/v1"))
        .header(CONTENT_TYPE, OCI_MANIFEST)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "MANIFEST_INVALID");

    let mut digests = Vec::new();
    for (i, (tag, mt)) in [
        ("v1", OCI_MANIFEST),
        ("v2", DOCKER_MANIFEST),
        ("v3", OCI_MANIFEST),
    ]
    .iter()
    .enumerate()
    {
        let m =
            image_manifest(mt, &cd, config.len(), &[(ld.clone(), layer.len())]) + &" ".repeat(i);
        let resp = http()
            .put(format!("{url}/v2/lib/app/manifests/{tag}"))
            .header(CONTENT_TYPE, *mt)
            .body(m.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let d = Digest::of(m.as_bytes());
        assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
        let resp = http()
            .get(format!("{url}/v2/lib/app/manifests/{tag}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()[CONTENT_TYPE], *mt);
        assert_eq!(resp.headers()["docker-content-digest"], d.as_str());
        assert_eq!(resp.headers()[CONTENT_LENGTH], m.len().to_string().as_str());
        assert_eq!(resp.text().await.unwrap(), m);
        let resp = http()
            .head(format!("{url}/v2/lib/app/manifests/{d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], *mt);
        digests.push((d, m.len()));
    }
    // An index over two of them, pushed by digest.
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": digests[..2].iter().map(|(d, n)| serde_json::json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": n})).collect::<Vec<_>>(),
    })
    .to_string();
    let id = Digest::of(index.as_bytes());
    let resp = http()
        .put(format!("{url}/v2/lib/app/manifests/{id}"))
        .header(CONTENT_TYPE, OCI_INDEX)
        .body(index.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // Pushing it by a digest that is not its own fails.
    let resp = http()
        .put(format!("{url}/v2/lib/app/manifests/{}", digests[0].0))
        .header(CONTENT_TYPE, OCI_INDEX)
        .body(index)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "DIGEST_INVALID");

    // Tags with pagination.
    let resp = http()
        .get(format!("{url}/v2/lib/app/tags/list?n=2"))
        .send()
        .await
        .unwrap();
    let link = resp.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(link, "</v2/lib/app/tags/list?n=2&last=v2>; rel=\"next\"");
    let v: serde_json::Value = resp.json_value().await;
    assert_eq!(v["name"], "lib/app");
    assert_eq!(v["tags"], serde_json::json!(["v1", "v2"]));
    let resp = http()
        .get(format!("{url}/v2/lib/app/tags/list?n=2&last=v2"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("link").is_none());
    assert_eq!(resp.json_value().await["tags"], serde_json::json!(["v3"]));
    push_blob(url, "zzz", b"x").await;
    let v = http()
        .get(format!("{url}/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(v["repositories"], serde_json::json!(["lib/app", "zzz"]));
    let resp = http()
        .get(format!("{url}/v2/_catalog?n=1"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["link"]
            .to_str()
            .unwrap()
            .contains("last=lib%2Fapp")
    );

    // Delete a tag, then a manifest by digest (which drops its tags).
    let resp = http()
        .delete(format!("{url}/v2/lib/app/manifests/v3"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = http()
        .get(format!("{url}/v2/lib/app/manifests/v3"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
    let resp = http()
        .delete(format!("{url}/v2/lib/app/manifests/{}", digests[0].0))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let v = http()
        .get(format!("{url}/v2/lib/app/tags/list"))
        .send()
        .await
        .unwrap()
        .json_value()
        .await;
    assert_eq!(v["tags"], serde_json::json!(["v2"]));
    let resp = http()
        .get(format!("{url}/v2/nothing/tags/list"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn invalid_names_and_references_are_refused() {
    let reg = TestRegistry::start(ApiConfig::default(), None).await;
    let url = &reg.url;
    for (path, code) in [
        ("/v2/UPPER/manifests/v1", "NAME_INVALID"),
        ("/v2/a/..%2f..%2fetc/manifests/v1", "NAME_INVALID"),
        ("/v2/a/blobs/sha256:123", "DIGEST_INVALID"),
        ("/v2/a/blobs/md5:00", "DIGEST_INVALID"),
        ("/v2/a/manifests/sha256:zz", "DIGEST_INVALID"),
    ] {
        let resp = http().get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(error_code(resp).await, code, "{path}");
    }
    // A raw path with `..` (reqwest would normalise it away).
    let addr = reg.addr;
    let status = tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /v2/a/../../etc/manifests/v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(status.contains("NAME_INVALID"), "{status}");
}

#[tokio::test]
async fn basic_auth_and_read_only() {
    let reg = TestRegistry::start(
        ApiConfig {
            read_only: false,
            basic_auth: Some(("kiln".into(), "s3cret".into())),
        },
        None,
    )
    .await;
    let resp = http().get(format!("{}/v2/", reg.url)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    assert_eq!(error_code(resp).await, "UNAUTHORIZED");
    let resp = http()
        .get(format!("{}/v2/", reg.url))
        .basic_auth("kiln", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = http()
        .get(format!("{}/v2/", reg.url))
        .basic_auth("kiln", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let ro = TestRegistry::start(
        ApiConfig {
            read_only: true,
            basic_auth: None,
        },
        None,
    )
    .await;
    let resp = http()
        .post(format!("{}/v2/app/blobs/uploads/", ro.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error_code(resp).await, "UNSUPPORTED");
    let resp = http()
        .delete(format!("{}/v2/app/manifests/v1", ro.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn serves_https() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let tls = kiln_registry_mirror::server::tls_acceptor(&cert, &key).unwrap();
    let reg = TestRegistry::start_at(
        &dir.path().join("root"),
        ApiConfig::default(),
        None,
        Some(tls),
    )
    .await;
    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let d = Digest::of(b"over tls");
    let resp = client
        .post(format!("{}/v2/app/blobs/uploads/?digest={d}", reg.url))
        .body("over tls")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let body = client
        .get(format!("{}/v2/app/blobs/{d}", reg.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "over tls");
    // Plain HTTP to the TLS port does not get an answer.
    assert!(
        http()
            .get(format!("http://{}/v2/", reg.addr))
            .send()
            .await
            .is_err()
    );
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}
