//! The trust service: a node holding the machine token but not the OS CA key (a worker) sends
//! a certificate signing request and gets an API server certificate. Only server
//! authentication is granted, and the subject's organisations are dropped, so a token holder
//! cannot mint a client certificate with a role.

use std::sync::Arc;

use kiln_os_api::pb;
use kiln_os_api::pb::trust_service_server::TrustService;
use rcgen::{
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose,
};
use tonic::{Request, Response, Status};

use crate::node::Node;

/// The service.
#[derive(Debug)]
pub struct TrustApi {
    node: Arc<Node>,
}

impl TrustApi {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[tonic::async_trait]
impl TrustService for TrustApi {
    async fn certificate(
        &self,
        req: Request<pb::CertificateRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        let r = req.into_inner();
        let cfg = self
            .node
            .config()
            .ok_or_else(|| Status::unavailable("this node has no configuration yet"))?;
        if !constant_time_eq(r.token.as_bytes(), cfg.machine.token.as_bytes()) {
            return Err(Status::permission_denied(
                "the machine token is wrong; use the token of this cluster's configuration",
            ));
        }
        let pair = cfg
            .machine
            .ca
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("no OS CA in the configuration"))?;
        let ca_pem = pair
            .cert_pem()
            .map_err(|e| Status::internal(e.to_string()))?;
        let key_pem = pair
            .key_pem()
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| {
                Status::failed_precondition("this node has no OS CA key; ask a control-plane node")
            })?;
        let ca_key = kiln_pki::parse_private_key_pem(&key_pem)
            .map_err(|e| Status::internal(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, &ca_key)
            .map_err(|e| Status::internal(e.to_string()))?;
        let csr_pem = String::from_utf8(r.csr)
            .map_err(|_| Status::invalid_argument("the CSR is not PEM text"))?;
        let mut csr = CertificateSigningRequestParams::from_pem(&csr_pem)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let cn = csr
            .params
            .subject_alt_names
            .iter()
            .find_map(|san| match san {
                rcgen::SanType::DnsName(name) => Some(name.as_str().to_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "node".to_owned());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        csr.params.distinguished_name = dn;
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(5);
        csr.params.not_after = now + time::Duration::days(365);
        csr.params.use_authority_key_identifier_extension = true;
        let cert = csr
            .signed_by(&issuer)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::CertificateResponse {
            ca: ca_pem.into_bytes(),
            crt: cert.pem().into_bytes(),
        }))
    }
}
