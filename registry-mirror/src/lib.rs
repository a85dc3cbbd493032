//! Kiln's OCI distribution registry with a pull-through mirror per upstream registry.
//!
//! Nodes of a lab cluster pull their installer and service images through it, as the
//! air-gapped guide does with an internal registry and `--registry-mirror`: images pushed to
//! it are served first, under the name with the registry host stripped; anything else is
//! fetched from the upstream that the request's `ns=<host>` parameter (containerd) or the
//! default upstream (Docker's `registry-mirrors`) selects, cached on disk, and served from the
//! cache afterwards, also when the upstream is gone.
//!
//! # Design
//!
//! - [`storage`]: content-addressed blobs on disk, written to a temporary file, verified and
//!   renamed into place; links, tags and resumable upload sessions as small files.
//! - [`api`]: the `/v2/` HTTP API (axum), with the standard error codes ([`api_error`]).
//! - [`mirror`]: upstreams, tag TTL, and single-flight blob fetches that stream to every
//!   waiting client from memory while a writer beside stores the blob; a fetched manifest is
//!   answered at once and stored beside.
//! - [`client`]: a distribution API client (reqwest, rustls/ring) with basic and bearer-token
//!   auth, used for upstreams and by [`archive`] to push and export OCI image layouts.
//! - [`server`]: the accept loop on an already-bound listener, HTTP or TLS, with a connection
//!   cap and graceful shutdown.
//!
//! # Limitations
//!
//! - Only `sha256` digests; Docker schema 1 manifests are refused.
//! - No garbage collection: deleting a manifest or unlinking a blob leaves the content in
//!   `blobs/` until the root is removed.
//! - `_catalog` and tag lists show pushed repositories (tag lists fall back to the mirror
//!   cache); they are not proxied to upstreams.
//! - Range requests on a blob that is still being fetched from an upstream are answered with
//!   the whole blob.
//! - A client's body of a cold blob ends when the digest matched, before the blob is synced
//!   and renamed into the store; if storing then fails (disk full), the next request fetches
//!   it again.
//! - Upload sessions live on disk; a chunk whose connection breaks is discarded and the client
//!   resumes from the session's previous end. Sessions idle for longer than the purge age are
//!   removed.
//! - Basic auth has one user; there is no token server and no per-repository access control.

pub mod api;
pub mod api_error;
pub mod archive;
pub mod client;
pub mod installer;
pub mod manifest;
pub mod mirror;
pub mod reference;
pub mod server;
pub mod storage;

pub use api::{ApiConfig, Registry, router};
pub use mirror::{Mirror, UpstreamConfig};
pub use storage::Storage;
