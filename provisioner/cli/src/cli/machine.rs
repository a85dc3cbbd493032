//! Commands against nodes through the OS API: `version`, `services`, `logs`, `reboot`,
//! `apply-config`, `bootstrap`, `etcd ...`, `get`, `meta`, `kubeconfig`, `ls`, `read`, `cp`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt as _;
use kiln_os_api::pb::{self, ApplyMode};
use serde::Serialize;

use super::GlobalArgs;
use super::connect::{Api, NodeErrors, node_name, status_error};
use kiln_provisioner::output::{self, OutputFormat};

/// Commands that talk to nodes.
#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Show the client and node versions.
    Version {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// List services and their state.
    Services,
    /// Show a service, or start, stop or restart it.
    Service {
        /// Service id (e.g. etcd).
        id: String,
        /// What to do; without it, show the service with its events.
        #[arg(value_enum)]
        action: Option<ServiceAction>,
    },
    /// Print a service's log (`machined` for machined's own).
    Logs {
        /// Service id.
        id: String,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Print only the last N lines.
        #[arg(long)]
        tail: Option<i32>,
    },
    /// Print the node's console log.
    Dmesg {
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// Print only the last N lines.
        #[arg(long)]
        tail: Option<i32>,
    },
    /// Print the node's events (boot phases, service transitions).
    Events {
        /// Keep printing new events.
        #[arg(short, long)]
        follow: bool,
        /// Print only the last N events.
        #[arg(long)]
        tail: Option<i32>,
    },
    /// Reboot the nodes.
    Reboot,
    /// Power the nodes off.
    Shutdown,
    /// Wipe the nodes' volumes and reboot or power off.
    Reset(ResetArgs),
    /// Apply a machine configuration.
    ApplyConfig(ApplyArgs),
    /// Bootstrap etcd on one control-plane node (once per cluster).
    Bootstrap {
        /// Recover etcd from this snapshot (from `kiln etcd snapshot` or a copied db file).
        #[arg(long, value_name = "FILE")]
        recover_from: Option<PathBuf>,
        /// Accept a snapshot without its integrity hash (a raw member/snap/db copy).
        #[arg(long, requires = "recover_from")]
        recover_skip_hash_check: bool,
    },
    /// Manage etcd.
    #[command(subcommand)]
    Etcd(EtcdCommand),
    /// Show resources (machinetype, machinestatus, services, members, etcdmembers,
    /// addresses, hostname, staticpods, meta, machineconfig).
    Get {
        /// Resource type.
        resource: String,
        /// Resource id.
        id: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Write or delete META records.
    #[command(subcommand)]
    Meta(MetaCommand),
    /// Download an admin kubeconfig for the cluster.
    Kubeconfig {
        /// Where to write it.
        #[arg(default_value = "kubeconfig")]
        path: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// List files on a node's volumes (/system/state, /var, /system/meta).
    Ls {
        /// Directory.
        #[arg(default_value = "/")]
        path: String,
        /// Levels to descend.
        #[arg(short, long, default_value_t = 1)]
        depth: i32,
    },
    /// Print a file from a node.
    Read {
        /// File path on the node.
        path: String,
    },
    /// Copy a file or directory from a node into a local directory.
    Cp {
        /// Path on the node.
        path: String,
        /// Local directory.
        #[arg(default_value = ".")]
        destination: PathBuf,
    },
}

/// `service ID ACTION`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ServiceAction {
    /// Start the service.
    Start,
    /// Stop the service.
    Stop,
    /// Restart the service.
    Restart,
}

/// `reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Leave etcd first (control-plane nodes); refused if that would lose quorum.
    #[arg(long)]
    graceful: bool,
    /// Reboot after the reset instead of powering off.
    #[arg(long)]
    reboot: bool,
    /// Volumes to wipe: STATE, EPHEMERAL (default: both).
    #[arg(long = "system-labels-to-wipe", value_name = "LABEL")]
    labels: Vec<String>,
}

/// How `apply-config` applies.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Mode {
    /// Without reboot when possible, else with.
    #[default]
    Auto,
    /// Only if no reboot is needed.
    NoReboot,
    /// Apply and reboot.
    Reboot,
    /// Store for the next boot.
    Staged,
    /// Apply without persisting; revert after --timeout.
    Try,
}

/// `apply-config`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The configuration file.
    #[arg(short, long)]
    file: PathBuf,
    /// For nodes in maintenance mode: TLS without client certificate, node not verified.
    #[arg(short, long)]
    insecure: bool,
    /// How to apply.
    #[arg(short, long, value_enum, default_value_t)]
    mode: Mode,
    /// Report what would happen without applying.
    #[arg(long)]
    dry_run: bool,
    /// For --mode try: how long before the previous configuration returns (e.g. 30s, 2m).
    #[arg(long, default_value = "1m", value_parser = super::parse_duration)]
    timeout: std::time::Duration,
}

/// `etcd ...`.
#[derive(Debug, Subcommand)]
pub enum EtcdCommand {
    /// List the members.
    Members,
    /// Show each node's member status.
    Status,
    /// Stream a snapshot of the database into FILE.
    Snapshot {
        /// Where to write it.
        file: PathBuf,
    },
    /// Defragment the member's database.
    Defrag,
    /// Alarms.
    #[command(subcommand)]
    Alarm(AlarmCommand),
    /// Make the node leave the cluster (refused if that would lose quorum).
    Leave,
    /// Remove another member by host name or hex ID.
    RemoveMember {
        /// Member host name or ID.
        member: String,
    },
    /// Hand leadership to another member if this node leads.
    ForfeitLeadership,
}

/// `etcd alarm ...`.
#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// List alarms.
    List,
    /// Clear alarms.
    Disarm,
}

/// `meta ...`.
#[derive(Debug, Subcommand)]
pub enum MetaCommand {
    /// Write a record.
    Write {
        /// Key: 0xa or 10.
        key: String,
        /// Value.
        value: String,
    },
    /// Delete a record.
    Delete {
        /// Key.
        key: String,
    },
}

fn parse_meta_key(text: &str) -> anyhow::Result<u32> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    };
    match parsed {
        Some(k) if k <= 0xff => Ok(k),
        _ => bail!("invalid META key {text:?}: write a byte such as 0xa or 10"),
    }
}

fn ago(unix_millis: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - unix_millis) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s % 3600) / 60),
    }
}

fn bytes_human(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// Runs a node command.
pub async fn run(cmd: MachineCommand, global: &GlobalArgs) -> anyhow::Result<()> {
    if let MachineCommand::ApplyConfig(args) = &cmd
        && args.insecure
    {
        return apply_insecure(args, global).await;
    }
    let mut api = Api::connect(global).await?;
    let mut errors = NodeErrors::default();
    match cmd {
        MachineCommand::Version { output } => {
            let resp = api
                .client
                .version(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            #[derive(Serialize)]
            struct Row {
                node: String,
                tag: String,
                platform: String,
                hostname: String,
                machine_type: String,
                stage: String,
            }
            let rows: Vec<Row> = resp
                .messages
                .into_iter()
                .filter(|m| errors.check(m.metadata.as_ref()))
                .map(|m| Row {
                    node: node_name(m.metadata.as_ref()),
                    tag: m.tag,
                    platform: m.platform,
                    hostname: m.hostname,
                    machine_type: m.machine_type,
                    stage: m.stage,
                })
                .collect();
            output::print(output, &rows, |rows| {
                let mut s = format!(
                    "Client:\n\tTag:         v{}\nServer:\n",
                    env!("CARGO_PKG_VERSION")
                );
                for r in rows {
                    s += &format!(
                        "\tNODE:        {}\n\tTag:         {}\n\tPlatform:    {}\n\tHostname:    {}\n\tType:        {}\n\tStage:       {}\n",
                        r.node, r.tag, r.platform, r.hostname, r.machine_type, r.stage
                    );
                }
                s
            })?;
        }
        MachineCommand::Services => {
            let resp = api
                .client
                .service_list(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut rows = Vec::new();
            for list in resp.messages {
                if !errors.check(list.metadata.as_ref()) {
                    continue;
                }
                let node = node_name(list.metadata.as_ref());
                for s in list.services {
                    let health = s.health.as_ref().map_or("?".to_owned(), |h| {
                        if h.unknown {
                            "?".into()
                        } else if h.healthy {
                            "OK".into()
                        } else {
                            "Fail".into()
                        }
                    });
                    let last = s.events.last();
                    rows.push(vec![
                        node.clone(),
                        s.id,
                        s.state,
                        health,
                        last.map(|e| ago(e.unix_millis)).unwrap_or_default(),
                        last.map(|e| e.message.clone()).unwrap_or_default(),
                    ]);
                }
            }
            print!(
                "{}",
                output::table(
                    &[
                        "NODE",
                        "SERVICE",
                        "STATE",
                        "HEALTH",
                        "LAST CHANGE",
                        "LAST EVENT"
                    ],
                    &rows
                )
            );
        }
        MachineCommand::Service { id, action } => match action {
            None => {
                let resp = api
                    .client
                    .service_list(api.request(pb::Empty {}))
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let mut found = false;
                for list in resp.messages {
                    if !errors.check(list.metadata.as_ref()) {
                        continue;
                    }
                    let node = node_name(list.metadata.as_ref());
                    for s in list.services.into_iter().filter(|s| s.id == id) {
                        found = true;
                        let h = s.health.unwrap_or_default();
                        println!(
                            "NODE     {node}\nID       {}\nSTATE    {}\nHEALTH   {}\nRESTARTS {}\nEVENTS",
                            s.id,
                            s.state,
                            if h.unknown {
                                "?".to_owned()
                            } else if h.healthy {
                                "OK".to_owned()
                            } else {
                                format!("Fail: {}", h.last_message)
                            },
                            s.restarts
                        );
                        for e in s.events {
                            println!(
                                "         [{}]: {} ({})",
                                e.state,
                                e.message.trim_start_matches(&format!("[{}]: ", e.state)),
                                ago(e.unix_millis)
                            );
                        }
                    }
                }
                if !found {
                    errors.finish()?;
                    bail!("service {id:?} not found");
                }
            }
            Some(a) => {
                let req = api.request(pb::ServiceRequest { id });
                let resp = match a {
                    ServiceAction::Start => api.client.service_start(req).await,
                    ServiceAction::Stop => api.client.service_stop(req).await,
                    ServiceAction::Restart => api.client.service_restart(req).await,
                }
                .map_err(status_error)?
                .into_inner();
                print_actions(resp, &mut errors);
            }
        },
        MachineCommand::Logs { id, follow, tail } => {
            for node in api.stream_targets() {
                let req = api.request_to(
                    &node,
                    pb::LogsRequest {
                        id: id.clone(),
                        follow,
                        tail_lines: tail.unwrap_or(-1),
                    },
                );
                let stream = api
                    .client
                    .logs(req)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                print_log_stream(stream, api.nodes.len() > 1).await?;
            }
        }
        MachineCommand::Dmesg { follow, tail } => {
            for node in api.stream_targets() {
                let req = api.request_to(
                    &node,
                    pb::DmesgRequest {
                        follow,
                        tail_lines: tail.unwrap_or(-1),
                    },
                );
                let stream = api
                    .client
                    .dmesg(req)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                print_log_stream(stream, api.nodes.len() > 1).await?;
            }
        }
        MachineCommand::Events { follow, tail } => {
            for node in api.stream_targets() {
                let req = api.request_to(
                    &node,
                    pb::EventsRequest {
                        follow,
                        tail_events: tail.unwrap_or(-1),
                    },
                );
                let mut stream = api
                    .client
                    .events(req)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                while let Some(e) = stream.next().await {
                    let e = e.map_err(status_error)?;
                    println!(
                        "{} {} {} {}: {}",
                        node_name(e.metadata.as_ref()),
                        e.unix_millis,
                        e.kind,
                        e.id,
                        e.message
                    );
                }
            }
        }
        MachineCommand::Reboot => print_actions(
            api.client
                .reboot(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner(),
            &mut errors,
        ),
        MachineCommand::Shutdown => print_actions(
            api.client
                .shutdown(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner(),
            &mut errors,
        ),
        MachineCommand::Reset(a) => {
            let labels: Vec<String> = a
                .labels
                .iter()
                .flat_map(|l| l.split(','))
                .map(|l| l.trim().to_uppercase())
                .collect();
            let req = api.request(pb::ResetRequest {
                graceful: a.graceful,
                reboot: a.reboot,
                system_labels_to_wipe: labels,
            });
            print_actions(
                api.client
                    .reset(req)
                    .await
                    .map_err(status_error)?
                    .into_inner(),
                &mut errors,
            );
        }
        MachineCommand::ApplyConfig(a) => {
            let data =
                std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
            let req = api.request(apply_request(&a, data));
            let resp = api
                .client
                .apply_configuration(req)
                .await
                .map_err(status_error)?
                .into_inner();
            print_apply(resp, &mut errors);
        }
        MachineCommand::Bootstrap {
            recover_from,
            recover_skip_hash_check,
        } => {
            let node = api.single_node("bootstrap")?;
            if let Some(file) = &recover_from {
                let data =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                let chunks = kiln_os_api::client::data_chunks(&data);
                let req = api.request_to(&node, futures::stream::iter(chunks));
                let resp = api
                    .client
                    .etcd_recover(req)
                    .await
                    .map_err(status_error)?
                    .into_inner();
                let size = resp.messages.first().map_or(0, |m| m.size);
                println!(
                    "recovering from snapshot {:?}: uploaded {size} bytes",
                    file.display().to_string()
                );
            }
            let req = api.request_to(
                &node,
                pb::BootstrapRequest {
                    recover_etcd: recover_from.is_some(),
                    recover_skip_hash_check,
                },
            );
            print_actions(
                api.client
                    .bootstrap(req)
                    .await
                    .map_err(status_error)?
                    .into_inner(),
                &mut errors,
            );
        }
        MachineCommand::Etcd(cmd) => etcd(&mut api, cmd, &mut errors).await?,
        MachineCommand::Get {
            resource,
            id,
            output,
        } => {
            let resp = match id {
                Some(id) => {
                    api.client
                        .get(api.request(pb::GetRequest {
                            r#type: resource,
                            id,
                        }))
                        .await
                }
                None => {
                    api.client
                        .list(api.request(pb::ListRequest { r#type: resource }))
                        .await
                }
            }
            .map_err(status_error)?
            .into_inner();
            print_resources(resp, output, &mut errors)?;
        }
        MachineCommand::Meta(cmd) => {
            let resp = match cmd {
                MetaCommand::Write { key, value } => {
                    api.client
                        .meta_write(api.request(pb::MetaWriteRequest {
                            key: parse_meta_key(&key)?,
                            value: value.into_bytes(),
                        }))
                        .await
                }
                MetaCommand::Delete { key } => {
                    api.client
                        .meta_delete(api.request(pb::MetaDeleteRequest {
                            key: parse_meta_key(&key)?,
                        }))
                        .await
                }
            }
            .map_err(status_error)?
            .into_inner();
            print_actions(resp, &mut errors);
        }
        MachineCommand::Kubeconfig { path, force } => {
            if path.exists() && !force {
                bail!(
                    "{} already exists; pass --force to overwrite it",
                    path.display()
                );
            }
            let node = api.single_node("kubeconfig")?;
            let resp = api
                .client
                .generate_kubeconfig(api.request_to(&node, pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let k = resp.messages.into_iter().next().context("empty answer")?;
            if !errors.check(k.metadata.as_ref()) {
                return errors.finish();
            }
            kiln_config::client::write_private(&path, &k.data)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("kubeconfig written to {}", path.display());
        }
        MachineCommand::Ls { path, depth } => {
            let mut rows = Vec::new();
            for node in api.stream_targets() {
                let mut stream = api
                    .client
                    .file_list(api.request_to(
                        &node,
                        pb::FileListRequest {
                            root: path.clone(),
                            recursion_depth: depth,
                        },
                    ))
                    .await
                    .map_err(status_error)?
                    .into_inner();
                while let Some(f) = stream.next().await {
                    let f = f.map_err(status_error)?;
                    rows.push(vec![
                        node_name(f.metadata.as_ref()),
                        format!("{:o}", f.mode & 0o7777).to_string()
                            + if f.is_dir { " d" } else { "" },
                        f.size.to_string(),
                        f.name,
                    ]);
                }
            }
            print!(
                "{}",
                output::table(&["NODE", "MODE", "SIZE(B)", "NAME"], &rows)
            );
        }
        MachineCommand::Read { path } => {
            let node = api.single_node("read")?;
            let mut stream = api
                .client
                .file_read(api.request_to(&node, pb::FileReadRequest { path }))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.map_err(status_error)?.bytes)?;
            }
        }
        MachineCommand::Cp { path, destination } => {
            let node = api.single_node("cp")?;
            let mut stream = api
                .client
                .file_copy(api.request_to(
                    &node,
                    pb::FileCopyRequest {
                        root_path: path.clone(),
                    },
                ))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut data = Vec::new();
            while let Some(chunk) = stream.next().await {
                data.extend_from_slice(&chunk.map_err(status_error)?.bytes);
            }
            std::fs::create_dir_all(&destination)
                .with_context(|| format!("creating {}", destination.display()))?;
            let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(data.as_slice()));
            archive
                .unpack(&destination)
                .with_context(|| format!("unpacking into {}", destination.display()))?;
            println!("copied {path} into {}", destination.display());
        }
    }
    errors.finish()
}

fn apply_request(a: &ApplyArgs, data: Vec<u8>) -> pb::ApplyConfigurationRequest {
    let mode = match a.mode {
        Mode::Auto => ApplyMode::Auto,
        Mode::NoReboot => ApplyMode::NoReboot,
        Mode::Reboot => ApplyMode::Reboot,
        Mode::Staged => ApplyMode::Staged,
        Mode::Try => ApplyMode::Try,
    };
    pb::ApplyConfigurationRequest {
        data,
        mode: mode as i32,
        dry_run: a.dry_run,
        try_timeout_millis: a.timeout.as_millis() as i64,
    }
}

fn print_apply(resp: pb::ApplyConfigurationResponse, errors: &mut NodeErrors) {
    for m in resp.messages {
        if !errors.check(m.metadata.as_ref()) {
            continue;
        }
        for w in &m.warnings {
            eprintln!("warning: {}: {w}", node_name(m.metadata.as_ref()));
        }
        println!(
            "{}: applied configuration ({}): {}",
            node_name(m.metadata.as_ref()),
            m.mode,
            m.summary
        );
    }
}

/// `apply-config --insecure`: straight to each node in maintenance mode.
async fn apply_insecure(a: &ApplyArgs, global: &GlobalArgs) -> anyhow::Result<()> {
    let nodes: Vec<String> = global
        .nodes
        .iter()
        .flat_map(|n| n.split(','))
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    if nodes.is_empty() {
        bail!(
            "apply-config --insecure needs the nodes to configure: pass -n NODE (the node's address)"
        );
    }
    let data = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut errors = NodeErrors::default();
    for node in nodes {
        let ch = kiln_os_api::client::connect_insecure(&node).await?;
        let mut client = kiln_os_api::client::machine_client(ch);
        match client
            .apply_configuration(tonic::Request::new(apply_request(a, data.clone())))
            .await
        {
            Ok(resp) => {
                let mut resp = resp.into_inner();
                for m in &mut resp.messages {
                    if let Some(md) = m.metadata.as_mut() {
                        md.hostname = node.clone();
                    }
                }
                print_apply(resp, &mut errors);
            }
            Err(s) => {
                errors.check(Some(&pb::Metadata {
                    hostname: node.clone(),
                    error: status_error(s).to_string(),
                }));
            }
        }
    }
    errors.finish()
}

fn print_actions(resp: pb::ActionResponse, errors: &mut NodeErrors) {
    for m in resp.messages {
        if errors.check(m.metadata.as_ref()) {
            println!("{}: {}", node_name(m.metadata.as_ref()), m.message);
        }
    }
}

async fn print_log_stream(
    mut stream: tonic::Streaming<pb::LogChunk>,
    prefix: bool,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        if prefix {
            out.write_all(format!("{}: ", node_name(chunk.metadata.as_ref())).as_bytes())?;
        }
        out.write_all(&chunk.bytes)?;
        out.flush()?;
    }
    Ok(())
}

#[derive(Serialize)]
struct ResourceOut {
    node: String,
    metadata: ResourceMeta,
    spec: serde_yaml::Value,
}

#[derive(Serialize)]
struct ResourceMeta {
    namespace: String,
    #[serde(rename = "type")]
    rtype: String,
    id: String,
    version: u64,
}

fn print_resources(
    resp: pb::ResourceResponse,
    format: OutputFormat,
    errors: &mut NodeErrors,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    for list in resp.messages {
        if !errors.check(list.metadata.as_ref()) {
            continue;
        }
        let node = node_name(list.metadata.as_ref());
        for r in list.resources {
            out.push(ResourceOut {
                node: node.clone(),
                metadata: ResourceMeta {
                    namespace: r.namespace,
                    rtype: r.r#type,
                    id: r.id,
                    version: r.version,
                },
                spec: serde_yaml::from_str(&r.spec).unwrap_or(serde_yaml::Value::String(r.spec)),
            });
        }
    }
    match format {
        OutputFormat::Yaml => {
            for r in &out {
                print!("---\n{}", serde_yaml::to_string(r)?);
            }
            Ok(())
        }
        _ => output::print(format, &out, |out| {
            let rows: Vec<Vec<String>> = out
                .iter()
                .map(|r| {
                    vec![
                        r.node.clone(),
                        r.metadata.namespace.clone(),
                        r.metadata.rtype.clone(),
                        r.metadata.id.clone(),
                        r.metadata.version.to_string(),
                    ]
                })
                .collect();
            output::table(&["NODE", "NAMESPACE", "TYPE", "ID", "VERSION"], &rows)
        }),
    }
}

async fn etcd(api: &mut Api, cmd: EtcdCommand, errors: &mut NodeErrors) -> anyhow::Result<()> {
    match cmd {
        EtcdCommand::Members => {
            let resp = api
                .client
                .etcd_member_list(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut rows = Vec::new();
            for list in resp.messages {
                if !errors.check(list.metadata.as_ref()) {
                    continue;
                }
                let node = node_name(list.metadata.as_ref());
                for m in list.members {
                    rows.push(vec![
                        node.clone(),
                        format!("{:x}", m.id),
                        m.hostname,
                        m.peer_urls.join(","),
                        m.client_urls.join(","),
                        m.is_learner.to_string(),
                    ]);
                }
            }
            print!(
                "{}",
                output::table(
                    &[
                        "NODE",
                        "ID",
                        "HOSTNAME",
                        "PEER URLS",
                        "CLIENT URLS",
                        "LEARNER"
                    ],
                    &rows
                )
            );
        }
        EtcdCommand::Status => {
            let resp = api
                .client
                .etcd_status(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let mut rows = Vec::new();
            for s in resp.messages {
                if !errors.check(s.metadata.as_ref()) {
                    continue;
                }
                let m = s.member_status.unwrap_or_default();
                let pct = if m.db_size > 0 {
                    m.db_size_in_use as f64 * 100.0 / m.db_size as f64
                } else {
                    0.0
                };
                rows.push(vec![
                    node_name(s.metadata.as_ref()),
                    format!("{:x}", m.member_id),
                    bytes_human(m.db_size),
                    format!("{} ({pct:.2}%)", bytes_human(m.db_size_in_use)),
                    format!("{:x}", m.leader),
                    m.raft_index.to_string(),
                    m.raft_term.to_string(),
                    m.raft_applied_index.to_string(),
                    m.is_learner.to_string(),
                    m.errors.join("; "),
                ]);
            }
            print!(
                "{}",
                output::table(
                    &[
                        "NODE",
                        "MEMBER",
                        "DB SIZE",
                        "IN USE",
                        "LEADER",
                        "RAFT INDEX",
                        "RAFT TERM",
                        "RAFT APPLIED INDEX",
                        "LEARNER",
                        "ERRORS"
                    ],
                    &rows
                )
            );
        }
        EtcdCommand::Snapshot { file } => {
            let node = api.single_node("etcd snapshot")?;
            let mut stream = api
                .client
                .etcd_snapshot(api.request_to(&node, pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            let tmp = file.with_extension("part");
            let mut out = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut info = None;
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(s) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(status_error(s));
                    }
                };
                if chunk.info.is_some() {
                    info = chunk.info;
                }
                size += chunk.bytes.len() as u64;
                out.write_all(&chunk.bytes)?;
            }
            out.sync_all()?;
            std::fs::rename(&tmp, &file)?;
            println!(
                "etcd snapshot saved to {:?} ({size} bytes)",
                file.display().to_string()
            );
            if let Some(i) = info {
                println!(
                    "snapshot info: hash {:08x}, revision {}, total keys {}, total size {}",
                    i.hash, i.revision, i.total_keys, i.total_size
                );
            }
        }
        EtcdCommand::Defrag => print_actions(
            api.client
                .etcd_defragment(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner(),
            errors,
        ),
        EtcdCommand::Alarm(a) => {
            let resp = match a {
                AlarmCommand::List => api.client.etcd_alarm_list(api.request(pb::Empty {})).await,
                AlarmCommand::Disarm => {
                    api.client
                        .etcd_alarm_disarm(api.request(pb::Empty {}))
                        .await
                }
            }
            .map_err(status_error)?
            .into_inner();
            let mut rows = Vec::new();
            for l in resp.messages {
                if !errors.check(l.metadata.as_ref()) {
                    continue;
                }
                for alarm in l.alarms {
                    rows.push(vec![
                        node_name(l.metadata.as_ref()),
                        format!("{:x}", alarm.member_id),
                        alarm.alarm,
                    ]);
                }
            }
            print!("{}", output::table(&["NODE", "MEMBER", "ALARM"], &rows));
        }
        EtcdCommand::Leave => print_actions(
            api.client
                .etcd_leave_cluster(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner(),
            errors,
        ),
        EtcdCommand::RemoveMember { member } => print_actions(
            api.client
                .etcd_remove_member(api.request(pb::EtcdRemoveMemberRequest { member }))
                .await
                .map_err(status_error)?
                .into_inner(),
            errors,
        ),
        EtcdCommand::ForfeitLeadership => {
            let resp = api
                .client
                .etcd_forfeit_leadership(api.request(pb::Empty {}))
                .await
                .map_err(status_error)?
                .into_inner();
            for m in resp.messages {
                if errors.check(m.metadata.as_ref()) {
                    let node = node_name(m.metadata.as_ref());
                    if m.member.is_empty() {
                        println!("{node}: not the leader; nothing to do");
                    } else {
                        println!("{node}: leadership moved to {}", m.member);
                    }
                }
            }
        }
    }
    Ok(())
}
