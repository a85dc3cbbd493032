//! The `kiln` front door: the command line. Each command group is a module under [`cli`]; the
//! logic lives in the libraries (`kiln-provisioner`, `kiln-config`, `kiln-pki`, machined's
//! `kiln-os-api`), so the same code serves `kiln`, the scenario engine and the tests.

pub mod cli;
pub mod logging;
