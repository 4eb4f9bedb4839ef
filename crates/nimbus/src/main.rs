//! `nimbus`: the server, the command-line client and the benchmark harness in one binary.

mod bench;
mod client;
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
    Deploy(client::deploy::DeployArgs),
    /// List, show and delete functions.
    #[command(name = "fn")]
    Fn(client::functions::FnArgs),
    /// Publish, list, show and delete a function's immutable versions.
    Version(client::versions::VersionArgs),
    /// Manage aliases: named routes to one version or a weighted split (canary releases).
    Alias(client::aliases::AliasArgs),
    /// Undo an alias's last routing change, or route it entirely to one version with --to.
    Rollback(client::aliases::RollbackArgs),
    /// Build, list and delete function-level snapshots (the initialized templates new
    /// instances start from), clean up stale ones and show totals.
    Snapshot(client::snapshots::SnapshotArgs),
    /// List, show and delete the sessions of a stateful function.
    Session(client::state::SessionArgs),
    /// Show and delete what a stateful function's state holds (a session's, or `_global`).
    State(client::state::StateArgs),
    /// Invoke a function and print what it returned.
    Invoke(client::invoke::InvokeArgs),
    /// List a function's recent invocations, or show one (`inv_…`) with its logs.
    Invocations(client::invoke::InvocationsArgs),
    /// Measure warm latency, throughput, a process-per-invocation baseline and idle memory.
    Bench(bench::BenchArgs),
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
        Command::Deploy(args) => client::deploy::run(args).await,
        Command::Fn(args) => client::functions::run(args).await,
        Command::Version(args) => client::versions::run(args).await,
        Command::Alias(args) => client::aliases::run(args).await,
        Command::Rollback(args) => client::aliases::run_rollback(args).await,
        Command::Snapshot(args) => client::snapshots::run(args).await,
        Command::Session(args) => client::state::run_session(args).await,
        Command::State(args) => client::state::run_state(args).await,
        Command::Invoke(args) => client::invoke::run_invoke(args).await,
        Command::Invocations(args) => client::invoke::run_invocations(args).await,
        Command::Bench(args) => bench::run(args).await,
    };
    Ok(client::finish(result))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
