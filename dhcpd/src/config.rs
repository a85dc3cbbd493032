//! The server's configuration file (YAML, written by the lab): the network's options, the
//! static leases by MAC, an optional dynamic pool and network boot.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnetwork::Ipv4Network as Ipv4Net;
use serde::{Deserialize, Serialize};

/// A 48-bit Ethernet address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// A MAC address that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid MAC address {0:?}: write six hex bytes separated by colons, e.g. 52:54:00:12:34:56"
)]
pub struct MacParseError(String);

impl FromStr for Mac {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let part = parts.next().ok_or_else(|| MacParseError(s.to_owned()))?;
            if part.len() != 2 {
                return Err(MacParseError(s.to_owned()));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacParseError(s.to_owned()))?;
        }
        if parts.next().is_some() {
            return Err(MacParseError(s.to_owned()));
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One static lease: the address and host name a MAC always gets, and per-host overrides of
/// the network's options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticLease {
    /// The client's hardware address.
    pub mac: Mac,
    /// The address it always gets.
    pub address: Ipv4Addr,
    /// Its host name (option 12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Interface MTU (option 26) for this host, instead of the network's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Gateway (option 3) for this host, instead of the network's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6) for this host, instead of the network's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<Ipv4Addr>>,
}

/// A dynamic pool: the inclusive range of addresses handed to MACs with no static lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pool {
    /// First address of the range.
    pub start: Ipv4Addr,
    /// Last address of the range (inclusive).
    pub end: Ipv4Addr,
}

/// Network boot: what PXE and iPXE clients are told.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootConfig {
    /// The TFTP server (`siaddr`, option 66); default: the server address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_server: Option<Ipv4Addr>,
    /// Boot file name by client architecture (option 93, RFC 4578: 0 BIOS, 7 and 9 x86-64
    /// UEFI, 11 ARM64 UEFI).
    #[serde(default)]
    pub files: BTreeMap<u16, String>,
    /// The boot script URL given to iPXE (user class `iPXE`) instead of a boot file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipxe_script_url: Option<String>,
    /// Directory served read-only over TFTP; none: no TFTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tftp_root: Option<PathBuf>,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// The server's own address on the network: the server identifier (option 54).
    pub server_address: Ipv4Addr,
    /// The network the clients are on; gives the subnet mask and broadcast address.
    pub subnet: Ipv4Net,
    /// Default gateway (option 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<Ipv4Addr>,
    /// Domain name (option 15).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_name: Option<String>,
    /// Interface MTU (option 26).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Lease time in seconds (option 51); renewal is at half, rebinding at 7/8.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u32,
    /// Static leases by MAC.
    #[serde(default)]
    pub static_leases: Vec<StaticLease>,
    /// Dynamic pool for MACs with no static lease; none: such MACs get no answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<Pool>,
    /// Network boot; none: no boot options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootConfig>,
    /// UDP port replies to clients go to (68; tests and benchmarks may move it).
    #[serde(default = "default_client_port")]
    pub client_port: u16,
}

fn default_lease_secs() -> u32 {
    3600
}

fn default_client_port() -> u16 {
    68
}

impl Config {
    /// A configuration with no leases, no pool and no boot options.
    pub fn new(server_address: Ipv4Addr, subnet: Ipv4Net) -> Self {
        Self {
            server_address,
            subnet,
            router: None,
            dns_servers: Vec::new(),
            domain_name: None,
            mtu: None,
            lease_secs: default_lease_secs(),
            static_leases: Vec::new(),
            pool: None,
            boot: None,
            client_port: default_client_port(),
        }
    }

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Writes the configuration as YAML (the lab's side).
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = serde_yaml::to_string(self).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        std::fs::write(path, text).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks that addresses are on the subnet, MACs and addresses unique, the pool sane.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let subnet = trunc(self.subnet);
        let outside = |what: String, address: Ipv4Addr| ConfigError::OutsideSubnet {
            what,
            address,
            subnet,
        };
        if !subnet.contains(self.server_address) {
            return Err(outside("serverAddress".into(), self.server_address));
        }
        if self.lease_secs < 10 {
            return Err(ConfigError::LeaseTooShort(self.lease_secs));
        }
        let mut macs = HashMap::new();
        let mut addresses = HashMap::new();
        for lease in &self.static_leases {
            if !subnet.contains(lease.address)
                || lease.address == subnet.network()
                || lease.address == subnet.broadcast()
            {
                return Err(outside(
                    format!("static lease for {}", lease.mac),
                    lease.address,
                ));
            }
            if lease.address == self.server_address {
                return Err(ConfigError::ServerAddressLeased(lease.mac));
            }
            if let Some(other) = macs.insert(lease.mac, lease.address) {
                return Err(ConfigError::DuplicateMac {
                    mac: lease.mac,
                    first: other,
                    second: lease.address,
                });
            }
            if let Some(other) = addresses.insert(lease.address, lease.mac) {
                return Err(ConfigError::DuplicateAddress {
                    address: lease.address,
                    first: other,
                    second: lease.mac,
                });
            }
        }
        if let Some(pool) = &self.pool {
            for (what, a) in [("pool start", pool.start), ("pool end", pool.end)] {
                if !subnet.contains(a) {
                    return Err(outside(what.into(), a));
                }
            }
            if u32::from(pool.start) > u32::from(pool.end) {
                return Err(ConfigError::EmptyPool(*pool));
            }
        }
        Ok(())
    }
}

/// Why a configuration file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or written.
    #[error("cannot access the DHCP configuration {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid YAML for [`Config`].
    #[error("invalid DHCP configuration {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_yaml::Error,
    },
    /// An address is not a host address of the subnet.
    #[error(
        "{what} {address} is not a host address of the subnet {subnet}: use an address inside it"
    )]
    OutsideSubnet {
        /// What the address is.
        what: String,
        /// The address.
        address: Ipv4Addr,
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The lease time is too short to be useful.
    #[error("leaseSecs {0} is too short: use at least 10 seconds")]
    LeaseTooShort(u32),
    /// A static lease gives away the server's own address.
    #[error("the static lease for {0} has the server's own address: give it another one")]
    ServerAddressLeased(Mac),
    /// Two static leases for one MAC.
    #[error("MAC {mac} has two static leases ({first} and {second}): keep one")]
    DuplicateMac {
        /// The MAC.
        mac: Mac,
        /// The first address.
        first: Ipv4Addr,
        /// The second address.
        second: Ipv4Addr,
    },
    /// Two static leases for one address.
    #[error("address {address} is leased to both {first} and {second}: give each its own")]
    DuplicateAddress {
        /// The address.
        address: Ipv4Addr,
        /// The first MAC.
        first: Mac,
        /// The second MAC.
        second: Mac,
    },
    /// The pool's start is after its end.
    #[error("the pool {}-{} is empty: start must not be after end", .0.start, .0.end)]
    EmptyPool(Pool),
}

/// The subnet with its host bits cleared.
pub fn trunc(net: Ipv4Net) -> Ipv4Net {
    Ipv4Net::new(net.network(), net.prefix()).unwrap_or(net)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5254:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_the_lab_file_and_rejects_conflicts() {
        let yaml = r#"
serverAddress: 10.5.0.1
subnet: 10.5.0.0/24
router: 10.5.0.1
dnsServers: [10.5.0.1]
mtu: 1450
staticLeases:
  - {mac: "52:54:00:00:00:02", address: 10.5.0.2, hostname: cp-1}
pool: {start: 10.5.0.100, end: 10.5.0.200}
"#;
        let mut config: Config = serde_yaml::from_str(yaml).unwrap();
        config.validate().unwrap();
        assert_eq!(config.lease_secs, 3600);
        assert_eq!(config.static_leases[0].hostname.as_deref(), Some("cp-1"));

        config.static_leases.push(config.static_leases[0].clone());
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DuplicateMac { .. })
        ));
        config.static_leases[1].mac = "52:54:00:00:00:03".parse().unwrap();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::DuplicateAddress { .. })
        ));
        config.static_leases[1].address = "10.6.0.3".parse().unwrap();
        assert!(matches!(
            config.validate(),
            Err(ConfigError::OutsideSubnet { .. })
        ));
    }
}
