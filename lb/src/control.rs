//! The control socket: a Unix socket speaking one JSON request per line and one JSON response
//! per line, plus the client functions `kiln lb status` and `kiln cluster show` use.
//!
//! ```text
//! → {"op":"status"}
//! ← {"ok":true,"snapshot":{"frontends":[...]}}
//! → {"op":"set-upstreams","frontend":"k8s","upstreams":["10.5.0.2:6443"]}
//! ← {"ok":true,"snapshot":{...}}
//! ← {"ok":false,"error":"no frontend is called \"x\" (frontends: k8s, os-api)"}
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::balancer::{Balancer, Snapshot};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;
/// Control clients served at once.
const MAX_CLIENTS: usize = 16;
/// How long a client call waits for the whole exchange.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Every counter.
    Status,
    /// Replace one frontend's upstreams.
    SetUpstreams {
        /// Frontend name.
        frontend: String,
        /// The new upstream set.
        upstreams: Vec<SocketAddr>,
    },
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The counters after the request, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Snapshot>,
    /// What was wrong, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(snapshot: Snapshot) -> Self {
        Self {
            ok: true,
            snapshot: Some(snapshot),
            error: None,
        }
    }

    fn error(message: String) -> Self {
        Self {
            ok: false,
            snapshot: None,
            error: Some(message),
        }
    }
}

/// Answers one request.
pub fn answer(balancer: &Balancer, request: Request) -> Response {
    match request {
        Request::Status => Response::ok(balancer.snapshot()),
        Request::SetUpstreams {
            frontend,
            upstreams,
        } => match balancer.set_upstreams(&frontend, &upstreams) {
            Ok(_) => Response::ok(balancer.snapshot()),
            Err(e) => Response::error(e.to_string()),
        },
    }
}

/// Serves control clients on `listener` until `shutdown` completes.
pub async fn serve(listener: UnixListener, balancer: Balancer, shutdown: impl Future<Output = ()>) {
    let limit = Arc::new(Semaphore::new(MAX_CLIENTS));
    let accept = async {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let balancer = balancer.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(stream, &balancer).await {
                            tracing::debug!("control client: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

async fn serve_client(stream: UnixStream, balancer: &Balancer) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    loop {
        let line = match read_line(&mut lines).await? {
            Some(line) => line,
            None => return Ok(()),
        };
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer(balancer, request),
            Err(e) => Response::error(format!(
                "bad request ({e}); send one JSON object per line, e.g. {{\"op\":\"status\"}}"
            )),
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
}

/// One line of at most [`MAX_LINE`] bytes; `None` at end of stream.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = (&mut *r).take(MAX_LINE).read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") && n as u64 == MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "request line too long",
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket.
    #[error("cannot reach the load balancer at {}: {source} (is `kiln lb run` running?)", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The exchange broke off.
    #[error("load balancer control socket {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("load balancer at {} did not answer within {} s", path.display(), CLIENT_TIMEOUT.as_secs())]
    Timeout {
        /// The socket.
        path: PathBuf,
    },
    /// The answer is not a [`Response`].
    #[error("load balancer at {} sent a bad response: {source}", path.display())]
    BadResponse {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The balancer refused the request.
    #[error("load balancer refused the request: {0}")]
    Refused(String),
}

/// Sends one request and returns the counters from a successful response.
pub async fn request(path: &Path, request: &Request) -> Result<Snapshot, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let exchange = async {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ControlError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        write.write_all(&line).await.map_err(io)?;
        let answer = read_line(&mut BufReader::new(read))
            .await
            .map_err(io)?
            .ok_or_else(|| io(std::io::ErrorKind::UnexpectedEof.into()))?;
        serde_json::from_str::<Response>(&answer).map_err(|source| ControlError::BadResponse {
            path: path.to_owned(),
            source,
        })
    };
    let response = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| ControlError::Timeout {
            path: path.to_owned(),
        })??;
    match (response.ok, response.snapshot) {
        (true, Some(snapshot)) => Ok(snapshot),
        (_, _) => Err(ControlError::Refused(
            response
                .error
                .unwrap_or_else(|| "no reason given".to_owned()),
        )),
    }
}

/// The counters of the balancer behind `path`.
pub async fn status(path: &Path) -> Result<Snapshot, ControlError> {
    request(path, &Request::Status).await
}

/// Replaces the upstreams of `frontend` on the balancer behind `path`; returns the counters
/// after the change.
pub async fn set_upstreams(
    path: &Path,
    frontend: &str,
    upstreams: &[SocketAddr],
) -> Result<Snapshot, ControlError> {
    request(
        path,
        &Request::SetUpstreams {
            frontend: frontend.to_owned(),
            upstreams: upstreams.to_vec(),
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let r: Request = serde_json::from_str(
            r#"{"op":"set-upstreams","frontend":"k8s","upstreams":["127.0.0.1:1"]}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::SetUpstreams {
                frontend: "k8s".into(),
                upstreams: vec![SocketAddr::from(([127, 0, 0, 1], 1))]
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
    }
}
