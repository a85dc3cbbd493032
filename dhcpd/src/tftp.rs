//! The read-only TFTP server for boot files (RFC 1350 with the block-size, timeout and
//! transfer-size options), built on the `async-tftp` crate.

use std::future::Future;
use std::path::{Path, PathBuf};

/// Why the TFTP server could not run.
#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    /// The boot file directory is missing or unreadable.
    #[error("cannot serve {} over TFTP: {source}; create the directory or fix boot.tftpRoot", root.display())]
    Root {
        /// The directory.
        root: PathBuf,
        /// The cause.
        source: async_tftp::Error,
    },
    /// The server failed while serving.
    #[error("the TFTP server stopped: {0}")]
    Serve(async_tftp::Error),
}

/// Serves the files under `root`, read only, on `socket` (already bound, port 69 in the lab)
/// until `shutdown` completes. Transfers run on ephemeral ports of the same address.
pub async fn serve(
    socket: std::net::UdpSocket,
    root: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TftpError> {
    let root_err = |source| TftpError::Root {
        root: root.to_owned(),
        source,
    };
    let server = async_tftp::server::TftpServerBuilder::with_dir_ro(root)
        .map_err(root_err)?
        .std_socket(socket)
        .map_err(root_err)?
        .build()
        .await
        .map_err(root_err)?;
    tokio::select! {
        r = server.serve() => r.map_err(TftpError::Serve),
        () = shutdown => Ok(()),
    }
}
