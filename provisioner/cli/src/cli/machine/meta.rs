//! `meta write` and `meta delete`: META records on the nodes.

use anyhow::bail;
use clap::Subcommand;
use kiln_os_api::pb;

use super::print_actions;
use crate::cli::connect::{Api, NodeErrors, status_error};

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

/// `meta write KEY VALUE` or `meta delete KEY`.
pub(super) async fn meta(
    api: &mut Api,
    errors: &mut NodeErrors,
    cmd: MetaCommand,
) -> anyhow::Result<()> {
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
    print_actions(resp, errors);
    Ok(())
}

/// A META key (one byte) written in hex (`0xa`) or decimal (`10`).
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
