//! The command-line client: `deploy`, `fn`, `version`, `alias`, `rollback`, `snapshot`,
//! `session`, `state`, `invoke` and `invocations` against a Nimbus server's REST API
//! through [`nimbus_client`], with human-readable tables by default and `--output json`
//! for scripts.
//!
//! - [`deploy`], [`functions`], [`versions`], [`aliases`], [`snapshots`], [`state`],
//!   [`invoke`]: one module per command group.
//! - [`routing`]: alias routing on the command line (`--weights`, split tables).
//! - [`table`]: the aligned-column printer.

pub mod aliases;
pub mod deploy;
pub mod functions;
pub mod invoke;
pub mod routing;
pub mod snapshots;
pub mod state;
pub mod table;
pub mod versions;

use std::fmt::Display;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use nimbus_client::Client;
use serde::Serialize;

/// Default server URL of the client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// How results are printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable tables and summaries.
    #[default]
    Table,
    /// The server's JSON, for scripts.
    Json,
}

/// Options every client command takes: where the server is, how to authenticate, how to print.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection and output")]
pub struct Connection {
    /// URL of the Nimbus server.
    #[arg(long, env = "NIMBUS_SERVER", default_value = DEFAULT_SERVER, global = true)]
    pub server: String,
    /// API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "NIMBUS_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

impl Connection {
    /// A client of the server these options name.
    pub fn client(&self) -> Result<Client, CliError> {
        Ok(Client::new(&self.server, self.api_key.clone())?)
    }

    /// Whether `--output json` was asked for.
    pub fn json(&self) -> bool {
        self.output == Output::Json
    }
}

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The call to the server failed (its error answer, or no answer).
    #[error(transparent)]
    Client(#[from] nimbus_client::Error),
    /// Bad usage or a local failure, with a message for the user.
    #[error("{0}")]
    Usage(String),
    /// The failure was already printed in full; only the exit code remains.
    #[error("failed")]
    Reported,
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Usage(format!("{e:#}"))
    }
}

/// Ends a client command: prints its error (if any) as `error: …` and picks the exit code.
pub fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Reported) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints an answer as JSON, pretty, on stdout. It goes through [`serde_json::Value`] so
/// that keys come out sorted, as the server's own document does.
pub fn print_json(value: &impl Serialize) {
    let value = serde_json::to_value(value).unwrap_or_default();
    println!(
        "{}",
        serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
    );
}

/// A text field for display: `-` when empty.
pub fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

/// An optional field for display: `-` when absent or empty.
pub fn opt(value: &Option<impl Display>) -> String {
    match value {
        Some(v) => dash(&v.to_string()),
        None => "-".to_owned(),
    }
}
