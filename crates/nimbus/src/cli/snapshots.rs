//! `nimbus snapshot build|list|delete|cleanup|stats`: function-level snapshots (the
//! initialized templates new instances start from instead of starting cold).

use std::collections::BTreeMap;
use std::time::Instant;

use clap::{Args, Subcommand};
use nimbus_client::{
    BuildOutcome, BuildSnapshot, Cleanup, Client, Snapshot, SnapshotList, SnapshotStats,
};
use serde_json::json;

use super::table::{details, Table};
use super::{dash, opt, print_json, CliError, Connection};

/// `nimbus snapshot …`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Server, API key and output format (accepted after the subcommand too).
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// The subcommands of `nimbus snapshot`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Build the snapshot of a version (the newest by default), or join the build under
    /// way, and wait for it to end; a failed snapshot is built again.
    Build {
        /// Function name or id.
        function: String,
        /// Version to snapshot [default: the newest].
        #[arg(long, value_name = "N")]
        version: Option<u32>,
        /// Return as soon as the build is under way instead of waiting for its end.
        #[arg(long)]
        no_wait: bool,
    },
    /// List a function's snapshots, newest build first.
    List {
        /// Function name or id.
        function: String,
    },
    /// Delete one of a function's snapshots (new instances start cold until it is rebuilt).
    Delete {
        /// Function name or id.
        function: String,
        /// Snapshot id (`snap_…`, see `nimbus snapshot list`).
        snapshot: String,
    },
    /// Remove the snapshots that serve no more: failed, expired and corrupt ones.
    Cleanup {
        /// Only show what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Totals over every snapshot and this server's resident templates.
    Stats,
}

/// Runs `nimbus snapshot …`.
pub async fn run(args: SnapshotArgs) -> Result<(), CliError> {
    let client = args.conn.client()?;
    let json = args.conn.json();
    match args.command {
        SnapshotCommand::Build {
            function,
            version,
            no_wait,
        } => build(&client, &function, version, !no_wait, json).await?,
        SnapshotCommand::List { function } => {
            let list = client.list_snapshots(&function).await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", list_table(&list));
            }
        }
        SnapshotCommand::Delete { function, snapshot } => {
            client.delete_snapshot(&function, &snapshot).await?;
            if json {
                print_json(&json!({ "deleted": true, "id": snapshot }));
            } else {
                println!("deleted snapshot {snapshot} of {function}");
            }
        }
        SnapshotCommand::Cleanup { dry_run } => {
            let cleanup = client.cleanup_snapshots(dry_run).await?;
            if json {
                print_json(&cleanup);
            } else {
                let names = function_names(&client, &cleanup.removed).await;
                print!("{}", cleanup_text(&cleanup, &names));
            }
        }
        SnapshotCommand::Stats => {
            let stats = client.snapshot_stats().await?;
            if json {
                print_json(&stats);
            } else {
                print!("{}", stats_text(&stats));
            }
        }
    }
    Ok(())
}

/// `nimbus snapshot build`: a progress line while waiting, then the snapshot; a failed
/// build is an error (exit code 1) after the snapshot's details are shown.
async fn build(
    client: &Client,
    function: &str,
    version: Option<u32>,
    wait: bool,
    json: bool,
) -> Result<(), CliError> {
    if wait && !json {
        let which = match version {
            Some(n) => format!("{function} version {n}"),
            None => format!("{function} (newest version)"),
        };
        eprintln!("building snapshot of {which}…");
    }
    let started = Instant::now();
    let build = client
        .build_snapshot(function, &BuildSnapshot { version, wait })
        .await?;
    let snapshot = &build.snapshot;
    let failed = matches!(snapshot.status.as_str(), "failed" | "corrupt");
    if json {
        print_json(snapshot);
    } else {
        let headline = build_headline(
            function,
            build.outcome,
            snapshot,
            started.elapsed().as_secs_f64(),
        );
        print!("{headline}\n{}", snapshot_details(snapshot));
    }
    if failed {
        eprintln!(
            "error: the snapshot build of {function} version {} failed: {}",
            snapshot.version,
            opt(&snapshot.error_message)
        );
        return Err(CliError::Reported);
    }
    Ok(())
}

/// What a build request came to, from the answer's status and the snapshot.
fn build_headline(
    function: &str,
    outcome: BuildOutcome,
    snapshot: &Snapshot,
    seconds: f64,
) -> String {
    let version = snapshot.version;
    let state = snapshot.status.as_str();
    match (outcome, state) {
        (BuildOutcome::UnderWay, _) => format!(
            "snapshot build of {function} version {version} under way (not waited for); \
             follow it with: nimbus snapshot list {function}"
        ),
        (BuildOutcome::Built, _) => {
            format!("built snapshot of {function} version {version} in {seconds:.1} s")
        }
        (_, "ready") => {
            format!("snapshot of {function} version {version} is ready already; nothing was built")
        }
        (_, "failed") => format!("snapshot build of {function} version {version} failed"),
        _ => format!("snapshot of {function} version {version}: {state}"),
    }
}

/// The details view of one snapshot.
fn snapshot_details(s: &Snapshot) -> String {
    let mut pairs = vec![
        ("id", dash(&s.id)),
        ("version", s.version.to_string()),
        ("status", dash(&s.status)),
        ("resident", yes_no(s.resident)),
    ];
    if let Some(error) = &s.error_message {
        pairs.push(("error", dash(error)));
    }
    pairs.extend([
        ("driver", dash(&s.driver)),
        ("runtime", dash(&s.runtime)),
        ("memory", format!("{} MB", s.memory_mb)),
        ("forks", count_text(s.fork_count, s.avg_fork_ms)),
        ("restores", count_text(s.restore_count, s.avg_restore_ms)),
        ("failures", failures_text(s)),
        ("created", dash(&s.created_at)),
        ("last used", opt(&s.last_used_at)),
        ("expires", opt(&s.expires_at)),
    ]);
    details(&pairs)
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.into()
}

/// `3 (avg 1.4 ms)`, or `0`.
fn count_text(count: u64, avg_ms: f64) -> String {
    match count {
        0 => "0".into(),
        count => format!("{count} (avg {avg_ms:.1} ms)"),
    }
}

/// `2, the last corrupt at <time>: <why>`, or `0`.
fn failures_text(s: &Snapshot) -> String {
    let count = s.failure_count;
    let Some(last) = s.last_failure.as_ref().filter(|_| count > 0) else {
        return count.to_string();
    };
    format!(
        "{count}, the last {} at {}: {}",
        dash(&last.status),
        dash(&last.at),
        one_line(last.message.as_deref().unwrap_or("-"))
    )
}

/// `3 (1.4 ms)` for a table cell, or `0`.
fn short_count_text(count: u64, avg_ms: f64) -> String {
    match count {
        0 => "0".into(),
        count => format!("{count} ({avg_ms:.1} ms)"),
    }
}

/// A function's snapshots as a table; the error of a failed or corrupt one on the line
/// below it.
fn list_table(list: &SnapshotList) -> String {
    let snapshots = &list.snapshots;
    if snapshots.is_empty() {
        return "no snapshots\n".into();
    }
    let mut table = Table::new(&[
        "id",
        "version",
        "status",
        "resident",
        "forks",
        "restores",
        "failures",
        "last used",
        "expires",
    ]);
    for s in snapshots {
        table.row([
            dash(&s.id),
            s.version.to_string(),
            dash(&s.status),
            yes_no(s.resident),
            short_count_text(s.fork_count, s.avg_fork_ms),
            short_count_text(s.restore_count, s.avg_restore_ms),
            s.failure_count.to_string(),
            opt(&s.last_used_at),
            opt(&s.expires_at),
        ]);
    }
    let rendered = table.text();
    let mut lines = rendered.lines();
    let mut out = String::new();
    if let Some(header) = lines.next() {
        out.push_str(header);
        out.push('\n');
    }
    for (line, s) in lines.zip(snapshots) {
        out.push_str(line);
        out.push('\n');
        if let Some(error) = &s.error_message {
            out.push_str(&format!("  └ error: {}\n", one_line(error)));
        } else if s.failure_count > 0 {
            out.push_str(&format!("  └ failures: {}\n", failures_text(s)));
        }
    }
    out
}

/// Text on one line (control characters as spaces).
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Function id → name for the functions of these snapshots (the id itself when the
/// function cannot be read).
async fn function_names(client: &Client, snapshots: &[Snapshot]) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for s in snapshots {
        let id = &s.function_id;
        if names.contains_key(id) {
            continue;
        }
        let name = match client.get_function(id).await {
            Ok(f) => f.name,
            Err(_) => id.clone(),
        };
        names.insert(id.clone(), name);
    }
    names
}

/// What a cleanup removed (or would remove), as a headline and a table.
fn cleanup_text(cleanup: &Cleanup, names: &BTreeMap<String, String>) -> String {
    let dry = cleanup.dry_run;
    let removed = &cleanup.removed;
    if removed.is_empty() {
        return if dry {
            "nothing to clean up\n".into()
        } else {
            "nothing to clean up; no snapshot removed\n".into()
        };
    }
    let count = match removed.len() {
        1 => "1 snapshot".to_owned(),
        n => format!("{n} snapshots"),
    };
    let freed = bytes_text(cleanup.freed_bytes);
    let headline = if dry {
        format!("would remove {count} ({freed} on disk); run without --dry-run to remove them")
    } else {
        format!("removed {count} (freed {freed} on disk)")
    };
    let mut table = Table::new(&["id", "function", "version", "status", "reason"]);
    for s in removed {
        let function = &s.function_id;
        let reason = match (s.status.as_str(), &s.error_message) {
            (_, Some(error)) => error.clone(),
            ("ready", None) => format!("expired at {}", opt(&s.expires_at)),
            _ => "-".into(),
        };
        table.row([
            dash(&s.id),
            names.get(function).unwrap_or(function).clone(),
            s.version.to_string(),
            dash(&s.status),
            reason,
        ]);
    }
    format!("{headline}\n\n{}", table.text())
}

/// The stats as `key: value` lines.
fn stats_text(stats: &SnapshotStats) -> String {
    let by_status: Vec<String> = stats
        .by_status
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(status, n)| format!("{status} {n}"))
        .collect();
    let total = stats.total.to_string();
    let snapshots = if by_status.is_empty() {
        total
    } else {
        format!("{total} ({})", by_status.join(", "))
    };
    details(&[
        ("snapshots", snapshots),
        (
            "resident templates",
            format!(
                "{} ({} of a {} budget)",
                stats.resident_templates,
                bytes_text(stats.resident_bytes),
                bytes_text(stats.memory_budget_bytes)
            ),
        ),
        (
            "storage",
            format!("{} on disk", bytes_text(stats.storage_bytes)),
        ),
        ("forks", count_text(stats.forks, stats.avg_fork_ms)),
        ("restores", count_text(stats.restores, stats.avg_restore_ms)),
        ("failures", stats.failures.to_string()),
    ])
}

/// `512 B`, `3.4 MiB`, `1.0 GiB`.
fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(status: &str, error: Option<&str>) -> Snapshot {
        serde_json::from_value(json!({
            "id": "snap_1", "function_id": "fn_1", "version": 3, "status": status,
            "error_message": error, "resident": status == "ready", "driver": "process",
            "runtime": "python3.11", "memory_mb": 256,
            "fork_count": if status == "ready" { 7 } else { 0 }, "avg_fork_ms": 4.0,
            "restore_count": if status == "ready" { 2 } else { 0 },
            "avg_restore_ms": 81.25, "created_at": "t0", "last_used_at": null,
            "expires_at": "t9",
            "failure_count": if status == "ready" { 1 } else { 2 },
            "last_failure": {"status": "corrupt", "at": "t1", "message": "a file\nis missing"}
        }))
        .unwrap()
    }

    #[test]
    fn list_puts_errors_under_their_rows() {
        let list = SnapshotList {
            snapshots: vec![
                snapshot("ready", None),
                snapshot("failed", Some("RuntimeError: no\nmore")),
            ],
        };
        assert_eq!(
            list_table(&list),
            "ID      VERSION  STATUS  RESIDENT  FORKS       RESTORES     FAILURES  LAST USED  EXPIRES\n\
             snap_1  3        ready   yes       7 (4.0 ms)  2 (81.2 ms)  1         -          t9\n  \
             └ failures: 1, the last corrupt at t1: a file is missing\n\
             snap_1  3        failed  no        0           0            2         -          t9\n  \
             └ error: RuntimeError: no more\n"
        );
        assert_eq!(list_table(&SnapshotList::default()), "no snapshots\n");
    }

    #[test]
    fn build_headlines_follow_the_answer() {
        let ready = snapshot("ready", None);
        assert_eq!(
            build_headline("shop", BuildOutcome::Built, &ready, 1.234),
            "built snapshot of shop version 3 in 1.2 s"
        );
        assert!(
            build_headline("shop", BuildOutcome::Answered, &ready, 0.0).contains("ready already")
        );
        assert!(build_headline(
            "shop",
            BuildOutcome::UnderWay,
            &snapshot("building", None),
            0.0
        )
        .contains("under way"));
        assert_eq!(
            build_headline(
                "shop",
                BuildOutcome::Answered,
                &snapshot("failed", Some("x")),
                0.0
            ),
            "snapshot build of shop version 3 failed"
        );
        let text = snapshot_details(&snapshot("failed", Some("RuntimeError: no")));
        assert!(text.contains("error:     RuntimeError: no\n"), "{text}");
        assert!(text.contains("resident:  no\n"), "{text}");
        assert!(!snapshot_details(&ready).contains("error"));
        let text = snapshot_details(&ready);
        assert!(text.contains("forks:     7 (avg 4.0 ms)\n"), "{text}");
        assert!(text.contains("restores:  2 (avg 81.2 ms)\n"), "{text}");
        assert!(
            text.contains("failures:  1, the last corrupt at t1: a file is missing\n"),
            "{text}"
        );
    }

    #[test]
    fn cleanup_names_functions_and_reasons() {
        let names = BTreeMap::from([("fn_1".to_owned(), "shop".to_owned())]);
        let dry = Cleanup {
            dry_run: true,
            freed_bytes: 2048,
            removed: vec![snapshot("failed", Some("RuntimeError: no"))],
        };
        assert_eq!(
            cleanup_text(&dry, &names),
            "would remove 1 snapshot (2.0 KiB on disk); run without --dry-run to remove them\n\n\
             ID      FUNCTION  VERSION  STATUS  REASON\n\
             snap_1  shop      3        failed  RuntimeError: no\n"
        );
        let none = Cleanup::default();
        assert!(cleanup_text(&none, &names).starts_with("nothing to clean up"));
    }

    #[test]
    fn stats_show_nonzero_statuses_and_sizes() {
        let stats: SnapshotStats = serde_json::from_value(
            json!({"total": 3, "by_status": {"building": 0, "failed": 1, "ready": 2},
            "resident_templates": 2, "resident_bytes": 3 << 20,
            "memory_budget_bytes": 1u64 << 30, "storage_bytes": 0,
            "forks": 9, "avg_fork_ms": 3.5, "restores": 4, "avg_restore_ms": 81.5,
            "failures": 1}),
        )
        .unwrap();
        assert_eq!(
            stats_text(&stats),
            "snapshots:          3 (failed 1, ready 2)\n\
             resident templates: 2 (3.0 MiB of a 1.0 GiB budget)\n\
             storage:            0 B on disk\n\
             forks:              9 (avg 3.5 ms)\n\
             restores:           4 (avg 81.5 ms)\n\
             failures:           1\n"
        );
        assert_eq!(bytes_text(1023), "1023 B");
    }
}
