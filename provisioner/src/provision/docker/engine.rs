//! The Docker engine a cluster talks to: connecting (Engine API version negotiated, so Debian's
//! 20.10 / API 1.41 works), the errors it reports, and the node image imported from the
//! root filesystem that `kiln-image` writes.

use std::collections::HashMap;

use bollard::Docker;
use bollard::query_parameters::{CreateImageOptions, RemoveImageOptions};
use futures::StreamExt as _;
use kiln_image::rootfs::{Rootfs, RootfsInputs};

/// The repository of node images: `kiln/node:<version>`.
pub const IMAGE_REPO: &str = "kiln/node";
/// Label on every node image.
pub const IMAGE_LABEL: &str = "dev.kiln.node-image";
/// The engine used when neither `--docker-host` nor `DOCKER_HOST` says otherwise.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Why talking to the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No socket at the address.
    #[error(
        "no Docker engine at {host}: start dockerd (e.g. `dockerd --host {host}`) or pass --docker-host unix:///path/to/docker.sock"
    )]
    NoEngine {
        /// The address.
        host: String,
    },
    /// Only local sockets are supported.
    #[error("--docker-host {host}: only unix:// sockets are supported")]
    Scheme {
        /// The address.
        host: String,
    },
    /// An Engine API call failed.
    #[error("Docker engine at {host}: {what}: {source}")]
    Api {
        /// The address.
        host: String,
        /// What was being done.
        what: String,
        /// bollard's error.
        #[source]
        source: bollard::errors::Error,
    },
    /// The node image could not be made.
    #[error("building the node image: {0}")]
    Rootfs(#[from] kiln_image::rootfs::RootfsError),
    /// machined was not found.
    #[error(
        "no machined binary at {path}: build it (`cargo build -p kiln-machined`) or set KILN_MACHINED"
    )]
    NoMachined {
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
}

/// The socket path of a `unix://` address (or a bare path).
pub fn socket_path(host: &str) -> Result<&str, EngineError> {
    if let Some(p) = host.strip_prefix("unix://") {
        Ok(p)
    } else if host.starts_with('/') {
        Ok(host)
    } else {
        Err(EngineError::Scheme {
            host: host.to_owned(),
        })
    }
}

/// `--docker-host`, else `DOCKER_HOST`, else the default socket.
pub fn default_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_else(|_| DEFAULT_HOST.to_owned())
}

/// Connects and negotiates the API version.
pub async fn connect(host: &str) -> Result<Docker, EngineError> {
    let path = socket_path(host)?;
    if !std::path::Path::new(path).exists() {
        return Err(EngineError::NoEngine {
            host: host.to_owned(),
        });
    }
    let api = |what: &str| {
        let what = what.to_owned();
        move |source| EngineError::Api {
            host: host.to_owned(),
            what,
            source,
        }
    };
    let docker = Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
        .map_err(api("connecting"))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|_| EngineError::NoEngine {
            host: host.to_owned(),
        })?;
    docker.ping().await.map_err(api("ping"))?;
    Ok(docker)
}

/// The machined binary the node image carries: `KILN_MACHINED`, else `machined` next to the
/// running `kiln`.
pub fn machined_binary() -> Result<std::path::PathBuf, EngineError> {
    let path = match std::env::var_os("KILN_MACHINED") {
        Some(p) => std::path::PathBuf::from(p),
        None => crate::daemon::kiln_binary()
            .ok()
            .and_then(|k| k.parent().map(|d| d.join("machined")))
            .unwrap_or_else(|| "machined".into()),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(EngineError::NoMachined { path })
    }
}

/// Makes sure `kiln/node:<version>` exists on the engine, importing the root filesystem only
/// when no image of that version (a digest of its content) is there. Returns the reference.
pub async fn ensure_node_image(docker: &Docker, host: &str) -> Result<String, EngineError> {
    let rootfs = Rootfs::resolve(&RootfsInputs::new(machined_binary()?))?;
    let reference = format!("{IMAGE_REPO}:{}", rootfs.version());
    if docker.inspect_image(&reference).await.is_ok() {
        return Ok(reference);
    }
    let scratch = tempfile_dir()?;
    let tar = tokio::task::spawn_blocking({
        let rootfs = rootfs.clone();
        let scratch = scratch.clone();
        move || rootfs.write_tar(Vec::new(), &scratch, &kiln_image::Quiet)
    })
    .await
    .map_err(|e| {
        EngineError::Rootfs(kiln_image::rootfs::RootfsError::Write(
            std::io::Error::other(e),
        ))
    })??;
    let _ = std::fs::remove_dir_all(&scratch);
    let options = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(IMAGE_REPO.into()),
        tag: Some(rootfs.version()),
        changes: vec![
            format!("LABEL {IMAGE_LABEL}={}", rootfs.digest),
            "ENV PATH=/usr/bin".into(),
            format!("ENTRYPOINT [\"{}\"]", kiln_image::rootfs::MACHINED),
        ],
        ..Default::default()
    };
    let mut stream = docker.create_image(Some(options), Some(bollard::body_full(tar.into())), None);
    while let Some(item) = stream.next().await {
        item.map_err(|source| EngineError::Api {
            host: host.to_owned(),
            what: format!("importing {reference}"),
            source,
        })?;
    }
    Ok(reference)
}

/// Removes node images that no container uses any more; an image in use stays.
pub async fn remove_unused_node_images(docker: &Docker) {
    let filters = HashMap::from([("label".to_owned(), vec![IMAGE_LABEL.to_owned()])]);
    let Ok(images) = docker
        .list_images(Some(bollard::query_parameters::ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
    else {
        return;
    };
    for image in images {
        // Refused (409) while a container uses it: that is the point.
        let _ = docker
            .remove_image(
                &image.id,
                Some(RemoveImageOptions {
                    force: false,
                    noprune: false,
                    ..Default::default()
                }),
                None,
            )
            .await;
    }
}

fn tempfile_dir() -> Result<std::path::PathBuf, EngineError> {
    let dir = std::env::temp_dir().join(format!("kiln-node-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        EngineError::Rootfs(kiln_image::rootfs::RootfsError::Input {
            path: dir.clone(),
            source: e,
        })
    })?;
    Ok(dir)
}
