//! Templates: an initialized worker kept alive as the parent of new instances.
//!
//! A template is started like any worker, with [`LaunchSpec::template`] set, and answers
//! the runtime's handshake once its code is loaded. The driver then owns its connection and
//! starts instances from it ([`Template::spawn`]). How is the driver's business; for the
//! process driver it is a fork (the fork protocol, in `fork.rs`), for a microVM driver it
//! would be a restore of the VM's memory snapshot. Either way the caller gets a
//! [`Launched`] worker, as from [`Driver::launch`](crate::Driver::launch), which then
//! answers the runtime's handshake.
//!
//! [`LaunchSpec::template`]: crate::LaunchSpec::template

use std::fmt;
use std::path::Path;

use async_trait::async_trait;
use serde::Deserialize;

use crate::checkpoint::CheckpointError;
use crate::{DriverError, Launched};

/// A template ready to start instances.
#[async_trait]
pub trait Template: Send + Sync + fmt::Debug {
    /// Starts a new instance from the template, in a sandbox of its own with the limits and
    /// network of the template's launch spec. The worker answers the runtime's handshake
    /// next.
    async fn spawn(&self, instance_id: &str) -> Result<Launched, DriverError>;
    /// Whether the template still runs.
    fn alive(&self) -> bool;
    /// Readies the template to start its first instance as fast as later ones (the process
    /// driver's template forks a spare child ahead). Call it after any checkpoint.
    async fn fork_ahead(&self) -> Result<(), DriverError> {
        Ok(())
    }
    /// Forks two throwaway probes from the template, readied as instances are, in which the
    /// runtime draws once from every per-process generator it knows in the template, and
    /// reports which gave the same output in both: instances started from this template
    /// would share them. A template whose instances do not share its memory has nothing to
    /// compare.
    async fn probe(&self) -> Result<Probe, DriverError> {
        Ok(Probe::default())
    }
    /// Writes a checkpoint of the template, left running, into the empty directory `dir`,
    /// from which [`Driver::restore_template`](crate::Driver::restore_template) starts it
    /// again. Returns the paths (relative to `dir`) of the regular files written.
    async fn checkpoint(&self, dir: &Path) -> Result<Vec<String>, DriverError> {
        let _ = dir;
        Err(DriverError::failed("", CheckpointError::Unsupported))
    }
    /// Memory the template holds resident, bytes (what keeping it costs).
    fn resident_bytes(&self) -> Option<u64>;
    /// Why the driver stopped trusting this template because of what the function's code
    /// did to it (a child it forked did not enter its sandbox), if it did: not worth
    /// rebuilding from the same code.
    fn refused(&self) -> Option<String> {
        None
    }
}

/// What two probes of a template found (see [`Template::probe`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Probe {
    /// How many generators both probes drew from.
    #[serde(default)]
    pub compared: usize,
    /// Those of them that gave the same output in both (the first few, by name).
    #[serde(default)]
    pub same: Vec<String>,
    /// How many gave the same output in both.
    #[serde(default)]
    pub same_count: usize,
}
