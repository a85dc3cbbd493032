//! Numbers and names `kiln`, the node launcher and `machined` agree on.

/// OS API port (mutual TLS).
pub const API_PORT: u16 = 50000;
/// Certificate service port (server-only TLS, machine token).
pub const TRUST_PORT: u16 = 50001;
/// etcd client port.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd peer port.
pub const ETCD_PEER_PORT: u16 = 2380;

/// `machined` exit code asking the launcher to start it again (reboot).
pub const EXIT_REBOOT: i32 = 80;
/// `machined` exit code asking the launcher to stop (power off).
pub const EXIT_SHUTDOWN: i32 = 81;

/// Request metadata: comma-separated target nodes of a call.
pub const NODES_METADATA: &str = "nodes";
/// Request metadata set by a forwarding node: the role of the original caller.
pub const ROLE_METADATA: &str = "x-kiln-role";
/// Organisation of the certificates nodes use to forward calls: such a caller acts with the
/// role given in [`ROLE_METADATA`].
pub const ROLE_IMPERSONATOR: &str = "os:impersonator";

/// Environment variable holding a machine configuration (base64 of the YAML document).
pub const CONFIG_DATA_ENV: &str = "KILN_CONFIG_DATA";
/// Environment variable holding a path or http(s) URL of a machine configuration.
pub const CONFIG_ENV: &str = "KILN_CONFIG";

/// Volume labels.
pub const LABEL_STATE: &str = "STATE";
/// Volume labels.
pub const LABEL_EPHEMERAL: &str = "EPHEMERAL";
/// Volume labels.
pub const LABEL_META: &str = "META";

/// META key holding network configuration.
pub const META_KEY_NETWORK: u32 = 0xa;
