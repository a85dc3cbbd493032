//! Who may call what. The caller's role is the organisation of its client certificate
//! (`os:admin`, `os:operator`, `os:reader`); a node forwarding a call presents an
//! `os:impersonator` certificate and passes the original caller's role in metadata. One table
//! ([`TABLE`]) says which role each method needs; a tower layer enforces it before any handler
//! runs, and denies a method the table does not list. A test walks every method of the compiled
//! proto and fails on one without a row.

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

/// The role each method of `kiln.machine.MachineService` needs. A method missing here is
/// denied to every caller.
pub const TABLE: &[(&str, Role)] = {
    use Role::{Admin, Operator, Reader};
    &[
        ("Version", Reader),
        ("ServiceList", Reader),
        ("Logs", Reader),
        ("Dmesg", Reader),
        ("Events", Reader),
        ("EtcdMemberList", Reader),
        ("EtcdStatus", Reader),
        ("EtcdAlarmList", Reader),
        ("Get", Reader),
        ("List", Reader),
        ("FileList", Reader),
        ("ServiceStart", Operator),
        ("ServiceStop", Operator),
        ("ServiceRestart", Operator),
        ("Reboot", Operator),
        ("Shutdown", Operator),
        ("EtcdSnapshot", Operator),
        ("EtcdDefragment", Operator),
        ("EtcdAlarmDisarm", Operator),
        ("EtcdForfeitLeadership", Operator),
        ("FileRead", Operator),
        ("FileCopy", Operator),
        ("Reset", Admin),
        ("ApplyConfiguration", Admin),
        ("Bootstrap", Admin),
        ("EtcdRecover", Admin),
        ("EtcdLeaveCluster", Admin),
        ("EtcdRemoveMember", Admin),
        ("EtcdMemberAdd", Admin),
        ("MetaWrite", Admin),
        ("MetaDelete", Admin),
        ("GenerateKubeconfig", Admin),
        ("Upgrade", Admin),
        ("Rollback", Admin),
    ]
};

/// The role a method of `kiln.machine.MachineService` needs; `None` for a method the table
/// does not list (the layer denies it).
pub fn required_role(method: &str) -> Option<Role> {
    TABLE
        .iter()
        .find(|(name, _)| *name == method)
        .map(|(_, role)| *role)
}

/// How the table and a service's methods disagree.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableGaps {
    /// Methods of the service with no row: every caller is denied them.
    pub unlisted: Vec<String>,
    /// Rows naming no method of the service (a renamed or removed method).
    pub stale: Vec<String>,
    /// Methods with more than one row.
    pub duplicated: Vec<String>,
}

impl TableGaps {
    /// Whether table and methods agree.
    pub fn is_empty(&self) -> bool {
        self.unlisted.is_empty() && self.stale.is_empty() && self.duplicated.is_empty()
    }
}

/// Compares `table` with the `methods` a service declares.
pub fn table_gaps(table: &[(&str, Role)], methods: &[String]) -> TableGaps {
    let mut gaps = TableGaps::default();
    for m in methods {
        match table.iter().filter(|(name, _)| name == m).count() {
            0 => gaps.unlisted.push(m.clone()),
            1 => {}
            _ => gaps.duplicated.push(m.clone()),
        }
    }
    for (name, _) in table {
        if !methods.iter().any(|m| m == name) {
            gaps.stale.push((*name).to_owned());
        }
    }
    gaps
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

/// The decision of the layer: the caller's role, or the status refusing the call.
fn authorize(
    guard: Guard,
    service: &str,
    method: &str,
    caller: impl FnOnce() -> Result<Role, Status>,
) -> Result<Role, Status> {
    if service != kiln_os_api::MACHINE_SERVICE {
        // Other services (the trust service lives on another port) are not reachable here.
        return Err(Status::unimplemented(format!("unknown service {service}")));
    }
    match guard {
        Guard::Maintenance if allowed_in_maintenance(method) => Ok(Role::Admin),
        Guard::Maintenance => Err(Status::failed_precondition(format!(
            "the node is in maintenance mode: only version and apply-config --insecure \
             work until a configuration is applied ({method} refused)"
        ))),
        Guard::Authenticated => caller().and_then(|role| match required_role(method) {
            None => Err(Status::permission_denied(format!(
                "{method} is not in the authorization table of this node, so no role may call \
                 it (is the node older than the client?)"
            ))),
            Some(needed) if role >= needed => Ok(role),
            Some(needed) => Err(Status::permission_denied(format!(
                "{method} needs role {} or higher; the caller has {}",
                needed.as_str(),
                role.as_str()
            ))),
        }),
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
        let decision = authorize(self.guard, service, method, || caller_role(&req));
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

    /// Every method of the compiled proto has exactly one row, and every row names a method.
    #[test]
    fn every_method_of_the_proto_has_a_row() {
        let methods = kiln_os_api::service_methods(kiln_os_api::MACHINE_SERVICE);
        assert!(methods.len() >= TABLE.len(), "{methods:?}");
        let gaps = table_gaps(TABLE, &methods);
        assert!(
            gaps.is_empty(),
            "the authorization table (os/machined/src/api/auth.rs) and machine.proto disagree: \
             {gaps:?}; give every new method a row with the least role that may call it"
        );
        for m in &methods {
            assert!(required_role(m).is_some(), "{m}");
        }
    }

    /// The check above fails when a method is added to the proto without a row.
    #[test]
    fn a_method_without_a_row_is_reported() {
        let mut methods = kiln_os_api::service_methods(kiln_os_api::MACHINE_SERVICE);
        methods.push("EtcdDowngrade".to_owned());
        let gaps = table_gaps(TABLE, &methods);
        assert_eq!(gaps.unlisted, vec!["EtcdDowngrade".to_owned()]);
        assert!(!gaps.is_empty());
        // A row whose method left the proto, and a method with two rows, are reported too.
        let gaps = table_gaps(
            &[
                ("Version", Role::Reader),
                ("Version", Role::Admin),
                ("Gone", Role::Admin),
            ],
            &["Version".to_owned()],
        );
        assert_eq!(gaps.duplicated, vec!["Version".to_owned()]);
        assert_eq!(gaps.stale, vec!["Gone".to_owned()]);
        // And the layer denies an unlisted method even to an admin.
        let denied = authorize(
            Guard::Authenticated,
            kiln_os_api::MACHINE_SERVICE,
            "EtcdDowngrade",
            || Ok(Role::Admin),
        )
        .unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let allowed = authorize(
            Guard::Authenticated,
            kiln_os_api::MACHINE_SERVICE,
            "Reset",
            || Ok(Role::Admin),
        );
        assert_eq!(allowed.ok(), Some(Role::Admin));
        let refused = authorize(
            Guard::Authenticated,
            kiln_os_api::MACHINE_SERVICE,
            "Reset",
            || Ok(Role::Operator),
        )
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
