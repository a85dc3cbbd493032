//! Name lookups of machined's own HTTP clients (extra manifests, installer pulls) against the
//! configuration's `machine.network.nameservers`.
//!
//! On `metal` machined writes `/etc/resolv.conf` from them, but a `process` node shares the
//! host's files: without this, its lookups would go to the host's resolver, outside the lab
//! (an air-gapped cluster's nodes must ask the lab DNS, which records what they asked). With no
//! nameservers configured, the platform's resolver is used as before.
//!
//! A query is an A and an AAAA question over UDP to each server in turn (2 s each); the first
//! server that answers decides, and a refusal or `NXDOMAIN` is reported with the server's
//! answer. Answers to a host name are small, so a truncated answer is not retried over TCP.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Not a DNS name.
    #[error("{name:?} is not a DNS name: {reason}")]
    Name {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A server answered with an error.
    #[error("{server} answered {code} for {name}")]
    Answer {
        /// The server.
        server: SocketAddr,
        /// The name asked.
        name: String,
        /// Its response code.
        code: String,
    },
    /// No server answered.
    #[error("no nameserver answered for {name}: {reasons}")]
    NoAnswer {
        /// The name asked.
        name: String,
        /// Per server.
        reasons: String,
    },
}

/// A resolver that asks the configured nameservers.
#[derive(Debug, Clone)]
pub struct ConfiguredResolver {
    servers: Vec<SocketAddr>,
}

impl ConfiguredResolver {
    /// From `machine.network.nameservers` (addresses, port 53); `None` when none is an address.
    pub fn from_config(nameservers: &[String]) -> Option<Self> {
        let servers: Vec<SocketAddr> = nameservers
            .iter()
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        (!servers.is_empty()).then_some(Self { servers })
    }

    /// For a client built by machined: the configured nameservers of `config`, if any.
    pub fn for_reqwest(config: Option<&kiln_config::MachineConfig>) -> Option<Arc<Self>> {
        let servers = &config?.machine.network.as_ref()?.nameservers;
        Self::from_config(servers).map(Arc::new)
    }

    /// With explicit servers (tests use a port other than 53).
    pub fn with_servers(servers: Vec<SocketAddr>) -> Self {
        Self { servers }
    }

    /// The addresses of `host`: A and AAAA records from the first server that answers.
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let mut name = Name::from_ascii(host).map_err(|e| ResolveError::Name {
            name: host.to_owned(),
            reason: e.to_string(),
        })?;
        name.set_fqdn(true);
        let mut reasons = Vec::new();
        for &server in &self.servers {
            let mut found = Vec::new();
            let mut answered = false;
            let mut failure = None;
            for rtype in [RecordType::A, RecordType::AAAA] {
                match ask(server, &name, rtype).await {
                    Ok((ResponseCode::NoError, ips)) => {
                        answered = true;
                        found.extend(ips);
                    }
                    Ok((code, _)) => {
                        answered = true;
                        failure = Some(ResolveError::Answer {
                            server,
                            name: host.to_owned(),
                            code: code.to_string(),
                        });
                    }
                    Err(e) => reasons.push(format!("{server}: {e}")),
                }
            }
            if !found.is_empty() {
                return Ok(found);
            }
            if answered {
                return Err(failure.unwrap_or_else(|| ResolveError::Answer {
                    server,
                    name: host.to_owned(),
                    code: "no address".to_owned(),
                }));
            }
        }
        Err(ResolveError::NoAnswer {
            name: host.to_owned(),
            reasons: reasons.join("; "),
        })
    }
}

/// One question to one server: its response code and the addresses in the answer.
async fn ask(
    server: SocketAddr,
    name: &Name,
    rtype: RecordType,
) -> std::io::Result<(ResponseCode, Vec<IpAddr>)> {
    let id = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
        ^ std::process::id()) as u16;
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name.clone(), rtype));
    let bytes = msg.to_vec().map_err(std::io::Error::other)?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    } else {
        "[::]:0".parse().map_err(std::io::Error::other)?
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(&bytes).await?;
    let mut buf = vec![0u8; 4096];
    let answer = tokio::time::timeout(QUERY_TIMEOUT, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            // A datagram that is not the answer to this question (wrong id) is ignored.
            if let Ok(m) = Message::from_vec(&buf[..n])
                && m.metadata.id == id
            {
                return Ok::<_, std::io::Error>(m);
            }
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 2s"))??;
    let ips = answer
        .answers
        .iter()
        .filter_map(|r| r.data.ip_addr())
        .collect();
    Ok((answer.metadata.response_code, ips))
}

impl reqwest::dns::Resolve for ConfiguredResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = this.lookup(&host).await?;
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot DNS server on loopback answering every A question with `answer` (or
    /// refusing when `None`), counting the questions it got.
    async fn server(answer: Option<IpAddr>) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
                r.add_queries(q.queries.clone());
                let query = &q.queries[0];
                match answer {
                    None => r.metadata.response_code = ResponseCode::Refused,
                    Some(IpAddr::V4(v4)) if query.query_type() == RecordType::A => {
                        r.add_answer(hickory_proto::rr::Record::from_rdata(
                            query.name().clone(),
                            60,
                            hickory_proto::rr::RData::A(v4.into()),
                        ));
                    }
                    Some(_) => {}
                }
                let _ = socket.send_to(&r.to_vec().unwrap(), peer).await;
            }
        });
        (addr, asked)
    }

    #[tokio::test]
    async fn names_are_asked_of_the_configured_servers_only() {
        let ip: IpAddr = "10.5.0.1".parse().unwrap();
        let (addr, asked) = server(Some(ip)).await;
        let r = ConfiguredResolver::with_servers(vec![addr]);
        assert_eq!(r.lookup("registry.kiln.internal").await.unwrap(), vec![ip]);
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "A and AAAA"
        );
        // An address is not looked up.
        assert_eq!(
            r.lookup("10.9.9.9").await.unwrap(),
            vec!["10.9.9.9".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refusal_names_the_server_and_a_silent_server_times_out() {
        let (refusing, _) = server(None).await;
        let err = ConfiguredResolver::with_servers(vec![refusing])
            .lookup("example.com")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&refusing.to_string()) && err.contains("Refused"),
            "{err}"
        );
        // Nothing listens on this socket's port once it is dropped.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let gone = silent.local_addr().unwrap();
        let err = ConfiguredResolver::with_servers(vec![gone])
            .lookup("example.com")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no nameserver answered"), "{err}");
        drop(silent);
    }

    #[test]
    fn only_addresses_become_servers() {
        assert!(ConfiguredResolver::from_config(&[]).is_none());
        assert!(ConfiguredResolver::from_config(&["dns.example".into()]).is_none());
        let r = ConfiguredResolver::from_config(&["10.5.0.1".into(), "fd00::1".into()]).unwrap();
        assert_eq!(r.servers.len(), 2);
        assert_eq!(r.servers[0].port(), 53);
    }
}
