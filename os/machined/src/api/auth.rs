//! Who may call what. The caller's role is the organisation of its client certificate
//! (`os:admin`, `os:operator`, `os:reader`); a node forwarding a call presents an
//! `os:impersonator` certificate and passes the original caller's role in metadata. One table
//! ([`required_role`]) says which role each method needs; a tower layer enforces it before any
//! handler runs.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use kiln_os_api::contract::{ROLE_IMPERSONATOR, ROLE_METADATA};
use kiln_pki::{ROLE_ADMIN, ROLE_OPERATOR, ROLE_READER};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// Roles, least privileged first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read-only.
    Reader,
    /// Operate (reboot, services, snapshots) but not reconfigure.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    /// The certificate organisation of the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reader => ROLE_READER,
            Self::Operator => ROLE_OPERATOR,
            Self::Admin => ROLE_ADMIN,
        }
    }

    fn from_org(org: &str) -> Option<Self> {
        match org {
            ROLE_READER => Some(Self::Reader),
            ROLE_OPERATOR => Some(Self::Operator),
            ROLE_ADMIN => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The authenticated caller, available to handlers through request extensions.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// Its role.
    pub role: Role,
}

/// The role a method of `kiln.machine.MachineService` needs; `None` for unknown methods.
pub fn required_role(method: &str) -> Option<Role> {
    use Role::{Admin, Operator, Reader};
    Some(match method {
        "Version" | "ServiceList" | "Logs" | "Dmesg" | "Events" | "EtcdMemberList"
        | "EtcdStatus" | "EtcdAlarmList" | "Get" | "List" | "FileList" => Reader,
        "ServiceStart"
        | "ServiceStop"
        | "ServiceRestart"
        | "Reboot"
        | "Shutdown"
        | "EtcdSnapshot"
        | "EtcdDefragment"
        | "EtcdAlarmDisarm"
        | "EtcdForfeitLeadership"
        | "FileRead"
        | "FileCopy" => Operator,
        "Reset" | "ApplyConfiguration" | "Bootstrap" | "EtcdRecover" | "EtcdLeaveCluster"
        | "EtcdRemoveMember" | "EtcdMemberAdd" | "MetaWrite" | "MetaDelete"
        | "GenerateKubeconfig" => Admin,
        _ => return None,
    })
}

/// Methods a node in maintenance mode serves.
pub fn allowed_in_maintenance(method: &str) -> bool {
    matches!(method, "Version" | "ApplyConfiguration")
}

fn organizations(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    X509Certificate::from_der(der)
        .map(|(_, c)| {
            c.subject()
                .iter_organization()
                .filter_map(|o| o.as_str().ok().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Determines the caller's role from its certificate and metadata.
fn caller_role<B>(req: &http::Request<B>) -> Result<Role, Status> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .ok_or_else(|| {
            Status::unauthenticated("a client certificate signed by the OS CA is required")
        })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let orgs = organizations(leaf.as_ref());
    if orgs.iter().any(|o| o == ROLE_IMPERSONATOR) {
        let role = req
            .headers()
            .get(ROLE_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(Role::from_org)
            .ok_or_else(|| {
                Status::permission_denied("a forwarded call must name the caller's role")
            })?;
        return Ok(role);
    }
    orgs.iter()
        .filter_map(|o| Role::from_org(o))
        .max()
        .ok_or_else(|| Status::permission_denied(format!(
            "the client certificate has no Kiln role (organisations: {}); use a certificate with organisation os:admin, os:operator or os:reader",
            if orgs.is_empty() { "none".to_owned() } else { orgs.join(", ") }
        )))
}

/// Sets the role metadata on a request a node forwards.
pub fn set_forwarded_role<T>(req: &mut tonic::Request<T>, role: &str) {
    if let Ok(v) = role.parse() {
        req.metadata_mut().insert(ROLE_METADATA, v);
    }
}

/// Which server the layer guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Mutual TLS: roles from certificates.
    Authenticated,
    /// Maintenance mode: no client certificates; only version and apply-config.
    Maintenance,
}

/// The authorization layer.
#[derive(Debug, Clone, Copy)]
pub struct AuthLayer(pub Guard);

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            guard: self.0,
        }
    }
}

/// The service the layer wraps.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    guard: Guard,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", ""));
        let decision = if service != "kiln.machine.MachineService" {
            // Other services (the trust service lives on another port) are not reachable here.
            Err(Status::unimplemented(format!("unknown service {service}")))
        } else {
            match self.guard {
                Guard::Maintenance if allowed_in_maintenance(method) => Ok(Role::Admin),
                Guard::Maintenance => Err(Status::failed_precondition(format!(
                    "the node is in maintenance mode: only version and apply-config --insecure \
                     work until a configuration is applied ({method} refused)"
                ))),
                Guard::Authenticated => {
                    caller_role(&req).and_then(|role| match required_role(method) {
                        None => Ok(role),
                        Some(needed) if role >= needed => Ok(role),
                        Some(needed) => Err(Status::permission_denied(format!(
                            "{method} needs role {} or higher; the caller has {}",
                            needed.as_str(),
                            role.as_str()
                        ))),
                    })
                }
            }
        };
        match decision {
            Ok(role) => {
                req.extensions_mut().insert(Caller { role });
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_order_and_table() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Reader);
        assert_eq!(required_role("Reset"), Some(Role::Admin));
        assert_eq!(required_role("ApplyConfiguration"), Some(Role::Admin));
        assert_eq!(required_role("EtcdSnapshot"), Some(Role::Operator));
        assert_eq!(required_role("Version"), Some(Role::Reader));
        assert_eq!(required_role("Nope"), None);
        assert!(allowed_in_maintenance("ApplyConfiguration") && !allowed_in_maintenance("Reset"));
    }
}
