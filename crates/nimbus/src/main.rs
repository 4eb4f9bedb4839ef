//! `nimbus`: the server and the command-line client in one binary. (The benchmark harness
//! is its own binary, `nimbus-bench`.)

mod cli;
mod config;
mod serve;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Nimbus: a self-hosted serverless function platform.
#[derive(Debug, Parser)]
#[command(name = "nimbus", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (embedded defaults: SQLite in the data directory, 127.0.0.1:8080).
    Server(config::ServerArgs),
    /// Deploy a function from a file or a directory: create it, or publish a new version.
    Deploy(cli::deploy::DeployArgs),
    /// List, show and delete functions.
    #[command(name = "fn")]
    Fn(cli::functions::FnArgs),
    /// Publish, list, show and delete a function's immutable versions.
    Version(cli::versions::VersionArgs),
    /// Manage aliases: named routes to one version or a weighted split (canary releases).
    Alias(cli::aliases::AliasArgs),
    /// Undo an alias's last routing change, or route it entirely to one version with --to.
    Rollback(cli::aliases::RollbackArgs),
    /// Build, list and delete function-level snapshots (the initialized templates new
    /// instances start from), clean up stale ones and show totals.
    Snapshot(cli::snapshots::SnapshotArgs),
    /// List, show and delete the sessions of a stateful function.
    Session(cli::state::SessionArgs),
    /// Show and delete what a stateful function's state holds (a session's, or `_global`).
    State(cli::state::StateArgs),
    /// Invoke a function and print what it returned.
    Invoke(cli::invoke::InvokeArgs),
    /// List a function's recent invocations, or show one (`inv_…`) with its logs.
    Invocations(cli::invoke::InvocationsArgs),
}

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_env("NIMBUS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<ExitCode> {
    // The sandbox init is this binary re-executed by the server for each instance. It must
    // stay single-threaded, so it branches off before the async runtime starts.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == server::SANDBOX_INIT)
    {
        nimbus_sandbox::init::main();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    // The server logs its work; client commands only warnings, so their output stays clean.
    let server = matches!(cli.command, Command::Server(_));
    init_logging(if server { "info" } else { "warn" });
    let result = match cli.command {
        Command::Server(args) => return server::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Deploy(args) => cli::deploy::run(args).await,
        Command::Fn(args) => cli::functions::run(args).await,
        Command::Version(args) => cli::versions::run(args).await,
        Command::Alias(args) => cli::aliases::run(args).await,
        Command::Rollback(args) => cli::aliases::run_rollback(args).await,
        Command::Snapshot(args) => cli::snapshots::run(args).await,
        Command::Session(args) => cli::state::run_session(args).await,
        Command::State(args) => cli::state::run_state(args).await,
        Command::Invoke(args) => cli::invoke::run_invoke(args).await,
        Command::Invocations(args) => cli::invoke::run_invocations(args).await,
    };
    Ok(cli::finish(result))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
