//! The command-line client: `deploy`, `fn`, `version`, `alias`, `rollback`, `snapshot`,
//! `invoke` and `invocations` against a Nimbus server's REST API (`/api/v1`), with
//! human-readable tables by default and `--output json` for scripts.
//!
//! - [`http`]: the HTTP wrapper and the mapping of failures to [`CliError`].
//! - [`deploy`], [`functions`], [`versions`], [`aliases`], [`snapshots`], [`invoke`]: one
//!   module per command group.
//! - [`routing`]: alias routing on the command line (`--weights`, split tables).
//! - [`table`]: the aligned-column printer.

pub mod aliases;
pub mod deploy;
pub mod functions;
pub mod http;
pub mod invoke;
pub mod routing;
pub mod snapshots;
pub mod state;
pub mod table;
pub mod versions;

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::Value;

pub use http::{CliError, Client};

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

/// Prints a JSON value, pretty, on stdout.
pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A JSON field as display text: strings without quotes, `null` as `-`.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) if s.is_empty() => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
