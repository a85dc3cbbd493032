//! Every error of the API mapped to a gRPC status in one place.

use tonic::{Code, Status};

use crate::etcd::ops::EtcdOpError;
use crate::meta::MetaError;
use crate::supervisor::SupervisorError;
use crate::upgrade::UpgradeError;

/// Errors of API handlers.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request cannot be served in the node's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A dependency (etcd, another node) cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The node has no configuration yet (maintenance mode).
    #[error("the node has no configuration yet")]
    NoConfig,
    /// A control-plane call reached a worker.
    #[error("{what} runs on control-plane nodes only; this node is a worker")]
    NotControlPlane {
        /// The call (`etcd`, `bootstrap`, `kubeconfig`).
        what: &'static str,
    },
    /// etcd has not been started on this node yet.
    #[error("etcd has not started on this node yet")]
    EtcdNotStarted,
    /// etcd is not running on this node.
    #[error("etcd is not running on this node (it is {state})")]
    EtcdNotRunning {
        /// The service's state.
        state: &'static str,
    },
    /// The node is resetting, rebooting or shutting down: the call may work once it is back.
    #[error("the node is still {stage}; retry in a few seconds")]
    Stopping {
        /// The stage (`resetting`, `rebooting`, `shutting down`).
        stage: &'static str,
    },
    /// The configuration does not validate.
    #[error("the configuration is not valid: {0}")]
    InvalidConfig(String),
    /// A volume label that cannot be wiped.
    #[error(transparent)]
    UnknownLabel(#[from] crate::volumes::UnknownLabel),
    /// A supervisor request failed.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// A META request failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// An etcd operation failed.
    #[error(transparent)]
    Etcd(#[from] EtcdOpError),
    /// Disk I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An upgrade or rollback was refused or failed.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    /// A forwarded call failed.
    #[error(transparent)]
    Forwarded(Status),
}

impl ApiError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::InvalidArgument(_)
            | ApiError::InvalidConfig(_)
            | ApiError::UnknownLabel(_) => Status::invalid_argument(msg),
            ApiError::FailedPrecondition(_)
            | ApiError::NoConfig
            | ApiError::NotControlPlane { .. }
            | ApiError::EtcdNotStarted
            | ApiError::EtcdNotRunning { .. } => Status::failed_precondition(msg),
            ApiError::NotFound(_) => Status::not_found(msg),
            ApiError::Unavailable(_) | ApiError::Stopping { .. } => Status::unavailable(msg),
            ApiError::Supervisor(SupervisorError::UnknownService { .. }) => Status::not_found(msg),
            ApiError::Supervisor(SupervisorError::Timeout { .. }) => Status::deadline_exceeded(msg),
            ApiError::Meta(MetaError::NotFound(_)) => Status::not_found(msg),
            ApiError::Meta(MetaError::KeyRange(_) | MetaError::TooLarge(_)) => {
                Status::invalid_argument(msg)
            }
            ApiError::Meta(MetaError::Io(_)) | ApiError::Io { .. } => Status::internal(msg),
            ApiError::Etcd(EtcdOpError::NotRunning(_)) => Status::failed_precondition(msg),
            ApiError::Etcd(EtcdOpError::Certificates(_)) => Status::internal(msg),
            ApiError::Etcd(EtcdOpError::Etcd { .. }) => Status::unavailable(msg),
            ApiError::Upgrade(UpgradeError::InvalidReference { .. }) => {
                Status::invalid_argument(msg)
            }
            ApiError::Upgrade(
                UpgradeError::NoSlots
                | UpgradeError::InProgress
                | UpgradeError::NotRunning { .. }
                | UpgradeError::Quorum { .. }
                | UpgradeError::Slots(kiln_os_api::slots::SlotError::EmptySlot { .. }),
            ) => Status::failed_precondition(msg),
            ApiError::Upgrade(UpgradeError::Pull { .. } | UpgradeError::Etcd(_)) => {
                Status::unavailable(msg)
            }
            ApiError::Upgrade(
                UpgradeError::Io { .. }
                | UpgradeError::Slots(
                    kiln_os_api::slots::SlotError::Io { .. }
                    | kiln_os_api::slots::SlotError::Malformed { .. },
                ),
            ) => Status::internal(msg),
            ApiError::Forwarded(status) => Status::new(status.code(), status.message().to_owned()),
        }
    }
}

/// A result for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

/// Whether a status means the caller may retry.
pub fn is_retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded)
}
