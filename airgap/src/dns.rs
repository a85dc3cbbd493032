//! The lab DNS server: answers the cluster's own names (A and AAAA) from a zone the lab gives
//! it, and forwards every other name to upstream resolvers, or, in air-gapped mode, refuses it
//! (REFUSED) and records the attempt in the audit log. UDP and TCP, with hickory-server's
//! request handling; UDP queries are read by Kiln's own readers (see [`serve`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioTime};
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable as _, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::audit::{AuditEvent, AuditLog, Decision, Source};

/// The lab domain when the lab names none.
pub const DEFAULT_DOMAIN: &str = "kiln.internal";
/// How long one upstream gets to answer before the next is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The DNS helper's configuration (`dns.yaml` in the state directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsConfig {
    /// Addresses to serve on, UDP and TCP each (port 53 on the gateway in a lab).
    pub listen: Vec<SocketAddr>,
    /// The lab domain: names under it that the zone lacks get NXDOMAIN, never forwarded.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// Names and their addresses. A name without a trailing dot is relative to `domain`, and a
    /// single label (a node's host name) is also answered on its own.
    #[serde(default)]
    pub records: BTreeMap<String, Vec<IpAddr>>,
    /// Refuse every name outside the zone and audit it, instead of forwarding.
    #[serde(default)]
    pub airgapped: bool,
    /// Resolvers to forward to (`IP` or `IP:PORT`); empty: the host's `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upstreams: Vec<String>,
    /// TTL of the lab's answers, in seconds.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Forwarded queries in flight at once; more get SERVFAIL.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
}

fn default_domain() -> String {
    DEFAULT_DOMAIN.to_owned()
}

fn default_ttl() -> u32 {
    60
}

fn default_max_in_flight() -> usize {
    1024
}

impl DnsConfig {
    /// A configuration with defaults for everything but the listen addresses.
    pub fn new(listen: Vec<SocketAddr>) -> Self {
        Self {
            listen,
            domain: default_domain(),
            records: BTreeMap::new(),
            airgapped: false,
            upstreams: Vec::new(),
            ttl: default_ttl(),
            max_in_flight: default_max_in_flight(),
        }
    }

    /// Reads a YAML configuration file.
    pub fn load(path: &Path) -> Result<Self, DnsError> {
        let text = std::fs::read_to_string(path).map_err(|source| DnsError::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        serde_yaml::from_str(&text).map_err(|source| DnsError::ParseConfig {
            path: path.to_owned(),
            source,
        })
    }

    /// The configuration as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).unwrap_or_default()
    }
}

/// Setting up or running the DNS server failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The configuration file could not be read.
    #[error("reading DNS config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration file is not valid YAML for [`DnsConfig`].
    #[error("DNS config {path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_yaml::Error,
    },
    /// A name in the zone is not a DNS name.
    #[error("DNS name {name:?} is invalid ({reason}); use letters, digits, '-' and '.'")]
    BadName {
        /// The name as given.
        name: String,
        /// The parser's complaint.
        reason: String,
    },
    /// An upstream is not `IP` or `IP:PORT`.
    #[error("DNS upstream {0:?} is not IP or IP:PORT; write e.g. 10.0.0.53 or 127.0.0.1:5353")]
    BadUpstream(String),
    /// Forwarding mode without anywhere to forward to.
    #[error(
        "no upstream resolvers: {0} names no nameserver; give upstreams in the DNS config or run \
         in air-gapped mode"
    )]
    NoUpstreams(String),
    /// An upstream is the server itself: every forwarded query would loop.
    #[error("DNS upstream {0} is this server's own listen address; forwarding would loop")]
    UpstreamLoop(SocketAddr),
    /// Nothing to listen on.
    #[error("the DNS config lists no listen address; add e.g. listen: [10.5.0.1:53]")]
    NoListen,
    /// A socket could not be bound.
    #[error("binding DNS {proto} {addr}: {source}; is another DNS server using the port?")]
    Bind {
        /// `UDP` or `TCP`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The server stopped with an error.
    #[error("DNS server: {0}")]
    Serve(String),
}

/// The lab's names: fully qualified lower-case name → addresses.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    domain: Option<LowerName>,
    names: HashMap<LowerName, Addresses>,
}

#[derive(Debug, Clone, Default)]
struct Addresses {
    v4: Vec<Record>,
    v6: Vec<Record>,
}

impl Zone {
    /// Builds the zone of `config`.
    pub fn from_config(config: &DnsConfig) -> Result<Self, DnsError> {
        let bad = |name: &str, e: &dyn std::fmt::Display| DnsError::BadName {
            name: name.to_owned(),
            reason: e.to_string(),
        };
        let domain = config.domain.trim_end_matches('.');
        let origin = if domain.is_empty() {
            None
        } else {
            Some(Name::from_ascii(format!("{domain}.")).map_err(|e| bad(domain, &e))?)
        };
        let mut zone = Zone {
            domain: origin.as_ref().map(LowerName::from),
            names: HashMap::new(),
        };
        for (key, addrs) in &config.records {
            let mut names = Vec::new();
            if let Some(absolute) = key.strip_suffix('.') {
                names.push(Name::from_ascii(format!("{absolute}.")).map_err(|e| bad(key, &e))?);
            } else {
                let rel = Name::from_ascii(key).map_err(|e| bad(key, &e))?;
                if rel.num_labels() == 1 {
                    names.push(Name::from_ascii(format!("{key}.")).map_err(|e| bad(key, &e))?);
                }
                if let Some(origin) = &origin {
                    names.push(rel.append_domain(origin).map_err(|e| bad(key, &e))?);
                }
            }
            for name in names {
                let entry = zone.names.entry(LowerName::from(&name)).or_default();
                for ip in addrs {
                    let rdata = match ip {
                        IpAddr::V4(v4) => RData::A(A(*v4)),
                        IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                    };
                    let record = Record::from_rdata(name.clone(), config.ttl, rdata);
                    match ip {
                        IpAddr::V4(_) => entry.v4.push(record),
                        IpAddr::V6(_) => entry.v6.push(record),
                    }
                }
            }
        }
        Ok(zone)
    }

    fn lookup(&self, name: &LowerName) -> Option<&Addresses> {
        self.names.get(name)
    }

    fn in_domain(&self, name: &LowerName) -> bool {
        self.domain.as_ref().is_some_and(|d| d.zone_of(name))
    }
}

/// Where names outside the zone go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outside {
    /// Forwarded to these resolvers, in order.
    Forward(Vec<SocketAddr>),
    /// Refused and audited.
    Refuse,
}

/// The nameservers of a `resolv.conf` file (port 53).
pub fn resolv_conf_nameservers(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            // Drop a zone index (`fe80::1%eth0`): it cannot be used from here.
            let ip = rest.trim().split('%').next()?;
            ip.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn parse_upstream(s: &str) -> Result<SocketAddr, DnsError> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| DnsError::BadUpstream(s.to_owned()))
}

/// The request handler: zone, outside policy, audit log and the cap on forwarded queries.
#[derive(Debug)]
pub struct LabDns {
    zone: Zone,
    outside: Outside,
    audit: AuditLog,
    in_flight: Arc<Semaphore>,
}

impl LabDns {
    /// A handler for `config`; forwarding mode without configured upstreams reads
    /// `resolv_conf` (normally `/etc/resolv.conf`).
    pub fn new(config: &DnsConfig, audit: AuditLog, resolv_conf: &Path) -> Result<Self, DnsError> {
        let zone = Zone::from_config(config)?;
        let outside = if config.airgapped {
            Outside::Refuse
        } else {
            let mut ups = config
                .upstreams
                .iter()
                .map(|u| parse_upstream(u))
                .collect::<Result<Vec<_>, _>>()?;
            if ups.is_empty() {
                ups = resolv_conf_nameservers(resolv_conf);
            }
            if ups.is_empty() {
                return Err(DnsError::NoUpstreams(resolv_conf.display().to_string()));
            }
            if let Some(up) = ups.iter().find(|u| config.listen.contains(u)) {
                return Err(DnsError::UpstreamLoop(*up));
            }
            Outside::Forward(ups)
        };
        Ok(Self {
            zone,
            outside,
            audit,
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
        })
    }

    /// Whether `request` is answered without asking an upstream (a lab name, a name under the
    /// lab domain, a refusal, or a malformed query): the UDP readers answer those inline.
    fn answers_locally(&self, request: &Request) -> bool {
        match request.request_info() {
            Ok(info) => {
                matches!(self.outside, Outside::Refuse)
                    || self.zone.lookup(info.query.name()).is_some()
                    || self.zone.in_domain(info.query.name())
            }
            Err(_) => true,
        }
    }

    /// Where names outside the zone go.
    pub fn outside(&self) -> &Outside {
        &self.outside
    }

    async fn forward(&self, raw: &[u8], id: u16, ups: &[SocketAddr]) -> Result<Message, String> {
        let mut last = String::from("no upstream");
        for up in ups {
            match forward_one(raw, id, *up).await {
                Ok(m) => return Ok(m),
                Err(e) => {
                    tracing::debug!(upstream = %up, error = %e, "upstream did not answer");
                    last = format!("{up}: {e}");
                }
            }
        }
        Err(last)
    }
}

/// Sends `raw` to `up` over UDP (TCP when the answer is truncated) and parses the answer.
async fn forward_one(raw: &[u8], id: u16, up: SocketAddr) -> Result<Message, String> {
    let bytes = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let local: SocketAddr = match up {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await.map_err(|e| e.to_string())?;
        sock.connect(up).await.map_err(|e| e.to_string())?;
        sock.send(raw).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await.map_err(|e| e.to_string())?;
            // Ignore stray datagrams that do not carry our id.
            if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                buf.truncate(n);
                return Ok::<_, String>(buf);
            }
        }
    })
    .await
    .map_err(|_| format!("no answer within {UPSTREAM_TIMEOUT:?}"))??;
    let msg = Message::from_vec(&bytes).map_err(|e| format!("bad answer: {e}"))?;
    if !msg.metadata.truncation {
        return Ok(msg);
    }
    let bytes = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        let mut tcp = TcpStream::connect(up).await?;
        let len = u16::try_from(raw.len()).map_err(std::io::Error::other)?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(raw);
        tcp.write_all(&out).await?;
        let n = tcp.read_u16().await?;
        let mut buf = vec![0u8; usize::from(n)];
        tcp.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    })
    .await
    .map_err(|_| format!("no TCP answer within {UPSTREAM_TIMEOUT:?}"))?
    .map_err(|e| format!("TCP: {e}"))?;
    Message::from_vec(&bytes).map_err(|e| format!("bad TCP answer: {e}"))
}

fn failed(request: &Request, code: ResponseCode) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = code;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for LabDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if request.edns.is_some() {
            builder.edns(&edns);
        }
        let client = request.src();
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            let msg = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return send(&mut response, msg, request, ResponseCode::NotImp).await;
        }
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => {
                self.audit.record(
                    &AuditEvent::new(Source::Dns, client, "QUERY", "", Decision::Malformed)
                        .with_reason("not exactly one question"),
                );
                let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response, msg, request, ResponseCode::FormErr).await;
            }
        };
        let name = info.query.name();
        let qtype = info.query.query_type();
        if let Some(addrs) = self.zone.lookup(name) {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.authoritative = true;
            metadata.recursion_available = matches!(self.outside, Outside::Forward(_));
            let answers: &[Record] = match qtype {
                RecordType::A => &addrs.v4,
                RecordType::AAAA => &addrs.v6,
                RecordType::ANY => &[],
                _ => &[],
            };
            let any: Vec<&Record> = if qtype == RecordType::ANY {
                addrs.v4.iter().chain(addrs.v6.iter()).collect()
            } else {
                answers.iter().collect()
            };
            let msg = builder.build(metadata, any, [], [], []);
            return send(&mut response, msg, request, ResponseCode::NoError).await;
        }
        if self.zone.in_domain(name) {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.authoritative = true;
            metadata.response_code = ResponseCode::NXDomain;
            let msg = builder.build_no_records(metadata);
            return send(&mut response, msg, request, ResponseCode::NXDomain).await;
        }
        let ups = match &self.outside {
            Outside::Refuse => {
                self.audit.record(
                    &AuditEvent::new(
                        Source::Dns,
                        client,
                        qtype.to_string(),
                        name.to_string(),
                        Decision::Denied,
                    )
                    .with_reason("air-gapped: names outside the lab are refused"),
                );
                let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
                return send(&mut response, msg, request, ResponseCode::Refused).await;
            }
            Outside::Forward(ups) => ups,
        };
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(%client, "too many forwarded queries in flight; answering SERVFAIL");
            let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
            return send(&mut response, msg, request, ResponseCode::ServFail).await;
        };
        let mut event = AuditEvent::new(
            Source::Dns,
            client,
            qtype.to_string(),
            name.to_string(),
            Decision::Allowed,
        );
        event.bytes_sent = request.as_slice().len() as u64;
        match self
            .forward(request.as_slice(), request.metadata.id, ups)
            .await
        {
            Ok(answer) => {
                event.bytes_received = answer.to_vec().map(|v| v.len() as u64).unwrap_or(0);
                self.audit.record(&event);
                let mut metadata = answer.metadata;
                metadata.id = request.metadata.id;
                metadata.message_type = MessageType::Response;
                metadata.truncation = false;
                let code = metadata.response_code;
                let msg = builder.build(
                    metadata,
                    answer.answers.iter(),
                    answer.authorities.iter(),
                    [],
                    answer.additionals.iter(),
                );
                send(&mut response, msg, request, code).await
            }
            Err(e) => {
                self.audit
                    .record(&event.with_reason(format!("no upstream answered: {e}")));
                let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                send(&mut response, msg, request, ResponseCode::ServFail).await
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
    code: ResponseCode,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(error) => {
            tracing::debug!(%error, client = %request.src(), "sending a DNS answer failed");
            failed(request, code)
        }
    }
}

/// Bound sockets for the server: one UDP socket and one TCP listener per address.
#[derive(Debug)]
pub struct DnsSockets {
    /// UDP sockets.
    pub udp: Vec<UdpSocket>,
    /// TCP listeners.
    pub tcp: Vec<TcpListener>,
}

impl DnsSockets {
    /// Binds UDP and TCP on every address (port 0: the TCP listener takes the UDP port).
    pub async fn bind(listen: &[SocketAddr]) -> Result<Self, DnsError> {
        if listen.is_empty() {
            return Err(DnsError::NoListen);
        }
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for addr in listen {
            let u = UdpSocket::bind(addr)
                .await
                .map_err(|source| DnsError::Bind {
                    proto: "UDP",
                    addr: *addr,
                    source,
                })?;
            let bound = u.local_addr().map_err(|source| DnsError::Bind {
                proto: "UDP",
                addr: *addr,
                source,
            })?;
            let t = TcpListener::bind(bound)
                .await
                .map_err(|source| DnsError::Bind {
                    proto: "TCP",
                    addr: bound,
                    source,
                })?;
            udp.push(u);
            tcp.push(t);
        }
        Ok(Self { udp, tcp })
    }

    /// The UDP addresses actually bound (the TCP ones are the same).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|u| u.local_addr().ok())
            .collect()
    }
}

/// Serves `handler` on `sockets` until `shutdown` completes, then stops accepting and lets
/// queries in progress finish (TCP; UDP queries are answered in one round trip).
///
/// TCP goes through hickory-server's `Server`. UDP is read here, by one task per core sharing
/// each socket: a query for a lab name is answered inline by the same handler (no task per
/// query, no channel to a sender task), and only a query that is forwarded upstream, which can
/// take seconds, gets a task of its own. With hickory-server's UDP loop (a task per query) the
/// lab DNS answered about 70 % of unbound's rate in the benchmark.
pub async fn serve(
    sockets: DnsSockets,
    handler: LabDns,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DnsError> {
    let handler = Arc::new(handler);
    let mut server = Server::new(Shared(handler.clone()));
    for t in sockets.tcp {
        server.register_listener(t, TCP_IDLE, 64 * 1024);
    }
    let readers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let mut udp = tokio::task::JoinSet::new();
    for u in sockets.udp {
        let u = Arc::new(u);
        for _ in 0..readers {
            udp.spawn(serve_udp(u.clone(), handler.clone()));
        }
    }
    tokio::select! {
        r = server.block_until_done() => r.map_err(|e| DnsError::Serve(e.to_string())),
        Some(r) = udp.join_next() => match r {
            Ok(Err(e)) => Err(DnsError::Serve(format!("UDP: {e}"))),
            _ => Err(DnsError::Serve("a UDP reader ended".to_owned())),
        },
        () = shutdown => {
            tracing::info!("DNS server shutting down");
            udp.abort_all();
            server.shutdown_gracefully().await.map_err(|e| DnsError::Serve(e.to_string()))
        }
    }
}

/// The handler shared between hickory-server (TCP) and the UDP readers.
struct Shared(Arc<LabDns>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
    }
}

/// One UDP reader: receives queries and answers them (see [`serve`]).
async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<LabDns>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // An ICMP error caused by an earlier reply (the client went away): next.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                tracing::debug!(error = %e, "UDP receive");
                continue;
            }
            Err(e) => return Err(e),
        };
        // Fewer than 12 bytes is no DNS header: nothing to answer (as hickory-server does).
        let Ok(request) = Request::from_bytes(buf[..n].to_vec(), src, Protocol::Udp) else {
            if n >= 12 {
                // A header but no parsable message: FORMERR with the query's id.
                let mut reply = [0u8; 12];
                reply[..2].copy_from_slice(&buf[..2]);
                reply[2] = 0x80 | (buf[2] & 0x78); // QR, the query's opcode
                reply[3] = ResponseCode::FormErr.low();
                let _ = socket.send_to(&reply, src).await;
            }
            continue;
        };
        if request.metadata.message_type == MessageType::Response {
            continue; // never answer a response (reflection)
        }
        let responder = UdpResponder {
            socket: socket.clone(),
            dst: src,
        };
        if handler.answers_locally(&request) {
            handler
                .handle_request::<_, TokioTime>(&request, responder)
                .await;
        } else {
            let handler = handler.clone();
            tokio::spawn(async move {
                handler
                    .handle_request::<_, TokioTime>(&request, responder)
                    .await;
            });
        }
    }
}

/// Sends a response to one UDP client: encoded within the client's EDNS payload size (512
/// bytes without EDNS, RFC 1035 4.2.1); a response that does not fit becomes SERVFAIL.
#[derive(Clone)]
struct UdpResponder {
    socket: Arc<UdpSocket>,
    dst: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpResponder {
    async fn send_response<'a>(
        &mut self,
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let id = response.metadata().id;
        let max = response.edns().map_or(512, Edns::max_payload);
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = match response.destructive_emit(&mut encoder) {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "encoding a UDP response; answering SERVFAIL");
                bytes.clear();
                let mut encoder = BinEncoder::new(&mut bytes);
                let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header.emit(&mut encoder)?;
                ResponseInfo::from(header)
            }
        };
        self.socket.send_to(&bytes, self.dst).await?;
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DnsConfig {
        let mut c = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()]);
        c.domain = "lab.test".into();
        c.records
            .insert("cp-1".into(), vec!["10.5.0.2".parse().unwrap()]);
        c.records.insert(
            "kiln-default".into(),
            vec!["10.5.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
        );
        c.records.insert(
            "registry.example.".into(),
            vec!["10.5.0.1".parse().unwrap()],
        );
        c.airgapped = true;
        c
    }

    fn lower(s: &str) -> LowerName {
        LowerName::from(Name::from_ascii(s).unwrap())
    }

    #[test]
    fn zone_names_relative_absolute_and_single_label() {
        let z = Zone::from_config(&config()).unwrap();
        assert_eq!(z.lookup(&lower("cp-1.lab.test.")).unwrap().v4.len(), 1);
        assert_eq!(z.lookup(&lower("CP-1.Lab.Test.")).unwrap().v4.len(), 1);
        assert!(z.lookup(&lower("cp-1.")).is_some());
        let ep = z.lookup(&lower("kiln-default.lab.test.")).unwrap();
        assert_eq!((ep.v4.len(), ep.v6.len()), (1, 1));
        assert!(z.lookup(&lower("registry.example.")).is_some());
        assert!(z.lookup(&lower("registry.example.lab.test.")).is_none());
        assert!(z.in_domain(&lower("nope.lab.test.")));
        assert!(!z.in_domain(&lower("example.com.")));
    }

    #[test]
    fn config_round_trips_and_rejects_loops_and_missing_upstreams() {
        let c = config();
        assert_eq!(serde_yaml::from_str::<DnsConfig>(&c.to_yaml()).unwrap(), c);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("resolv.conf");
        std::fs::write(&empty, "search lab\n").unwrap();
        let mut fwd = c.clone();
        fwd.airgapped = false;
        assert!(matches!(
            LabDns::new(&fwd, AuditLog::discard(), &empty),
            Err(DnsError::NoUpstreams(_))
        ));
        fwd.listen = vec!["127.0.0.1:5353".parse().unwrap()];
        fwd.upstreams = vec!["127.0.0.1:5353".into()];
        assert!(matches!(
            LabDns::new(&fwd, AuditLog::discard(), &empty),
            Err(DnsError::UpstreamLoop(_))
        ));
        fwd.upstreams = vec!["not-an-ip".into()];
        assert!(matches!(
            LabDns::new(&fwd, AuditLog::discard(), &empty),
            Err(DnsError::BadUpstream(_))
        ));
    }

    #[test]
    fn resolv_conf_nameservers_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# c\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nsearch x\nnameserver bogus\n",
        )
        .unwrap();
        assert_eq!(
            resolv_conf_nameservers(&p),
            vec![
                "10.0.0.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
