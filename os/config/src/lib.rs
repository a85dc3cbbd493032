//! Kiln machine configuration: the v1alpha1 document every node boots from, its validation per
//! platform, configuration patches, generation from a secrets bundle, and the client config.
//!
//! # Design
//!
//! - [`types`] mirrors the machine configuration of the guides field for field (camelCase
//!   names, `deny_unknown_fields` everywhere), so existing documents validate unchanged for the
//!   parts Kiln covers and a misspelt field is an error, not a silent no-op.
//! - Parsing ([`from_yaml`]) reports the field path and line of structural errors; semantic
//!   checks ([`validate()`]) report every problem with its field path and a fix, per [`Mode`].
//! - [`patch`] implements strategic-merge and RFC 6902 patches over the YAML tree, then parses
//!   the result again, so a patch cannot produce a document the parser would reject.
//! - [`generate()`] turns a [`kiln_pki::SecretsBundle`] into `controlplane.yaml`, `worker.yaml`
//!   and a [`ClientConfig`]. Worker documents carry CA certificates without their keys.
//!
//! # Limitations
//!
//! - Of the multi-document format of later releases of the guides' OS, only
//!   `ExtensionServiceConfig` documents are read (beside the one v1alpha1 document); any other
//!   `kind` is refused with its line.
//! - Fields outside the list in `docs/machine-config.md` are rejected, even where the guides'
//!   OS would accept them.

pub mod client;
pub mod generate;
mod lenient;
pub mod parse;
pub mod patch;
pub mod types;
pub mod validate;

pub use client::{ClientConfig, ClientConfigError, Context};
pub use generate::{GenerateError, GenerateInput, GeneratedConfigs, generate};
pub use parse::{ParseError, from_yaml, to_yaml};
pub use patch::{Patch, PatchError};
pub use types::{ExtensionConfigFile, ExtensionServiceConfig, MachineConfig, MachineType};
pub use validate::{Mode, Problem, Report, ValidationError, validate};
