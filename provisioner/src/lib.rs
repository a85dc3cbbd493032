//! The `kiln` front door: the command line, output formatting and, in later parts, the
//! provisioners, the cluster state directory and the node launchers.
//!
//! # Design
//!
//! `main.rs` only parses arguments and maps errors to an exit code; each command group lives
//! in its own module under [`cli`] and calls into the libraries (`kiln-config`, `kiln-pki`)
//! that hold the logic, so the same code serves `kiln`, `machined` and the tests.
//!
//! # Limitations
//!
//! Only configuration commands exist so far: `gen`, `validate`, `config`, `completion`, `docs`.

pub mod cli;
pub mod daemon;
pub mod health;
pub mod launcher;
pub mod lb_helper;
pub mod logging;
pub mod network;
pub mod output;
pub mod progress;
pub mod provision;
pub mod state;
