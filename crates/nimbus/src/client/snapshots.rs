//! `nimbus snapshot build|list|delete|cleanup|stats`: function-level snapshots (the
//! initialized templates new instances start from instead of starting cold).

use std::collections::BTreeMap;
use std::time::Instant;

use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use super::http::segment;
use super::table::{details, Table};
use super::{print_json, text, CliError, Client, Connection, Output};

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

/// `/functions/{function}/snapshots`.
fn snapshots_path(function: &str) -> String {
    format!("/functions/{}/snapshots", segment(function))
}

/// Runs `nimbus snapshot …`.
pub async fn run(args: SnapshotArgs) -> Result<(), CliError> {
    let client = Client::from_connection(&args.conn)?;
    let json = args.conn.output == Output::Json;
    match args.command {
        SnapshotCommand::Build {
            function,
            version,
            no_wait,
        } => build(&client, &function, version, !no_wait, json).await?,
        SnapshotCommand::List { function } => {
            let list = client.get(&snapshots_path(&function), &[]).await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", list_table(&list));
            }
        }
        SnapshotCommand::Delete { function, snapshot } => {
            client
                .delete(&format!(
                    "{}/{}",
                    snapshots_path(&function),
                    segment(&snapshot)
                ))
                .await?;
            if json {
                print_json(&json!({ "deleted": true, "id": snapshot }));
            } else {
                println!("deleted snapshot {snapshot} of {function}");
            }
        }
        SnapshotCommand::Cleanup { dry_run } => {
            let cleanup = client
                .send(
                    Method::POST,
                    "/snapshots/cleanup",
                    &[("dry_run", dry_run.to_string())],
                    None,
                )
                .await?
                .into_result()?;
            if json {
                print_json(&cleanup);
            } else {
                let names = function_names(&client, &cleanup["removed"]).await;
                print!("{}", cleanup_text(&cleanup, &names));
            }
        }
        SnapshotCommand::Stats => {
            let stats = client.get("/snapshots/stats", &[]).await?;
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
    let mut body = json!({ "wait": wait });
    if let Some(version) = version {
        body["version"] = json!(version);
    }
    if wait && !json {
        let which = match version {
            Some(n) => format!("{function} version {n}"),
            None => format!("{function} (newest version)"),
        };
        eprintln!("building snapshot of {which}…");
    }
    let started = Instant::now();
    let reply = client
        .send_json(Method::POST, &snapshots_path(function), &body)
        .await?;
    let status = reply.status;
    let snapshot = reply.into_result()?;
    let failed = matches!(
        snapshot["status"].as_str(),
        Some("failed") | Some("corrupt")
    );
    if json {
        print_json(&snapshot);
    } else {
        let headline = build_headline(function, status, &snapshot, started.elapsed().as_secs_f64());
        print!("{headline}\n{}", snapshot_details(&snapshot));
    }
    if failed {
        eprintln!(
            "error: the snapshot build of {function} version {} failed: {}",
            text(&snapshot["version"]),
            text(&snapshot["error_message"])
        );
        return Err(CliError::Reported);
    }
    Ok(())
}

/// What a build request came to, from the answer's status and the snapshot.
fn build_headline(function: &str, status: StatusCode, snapshot: &Value, seconds: f64) -> String {
    let version = text(&snapshot["version"]);
    let state = snapshot["status"].as_str().unwrap_or_default();
    match (status, state) {
        (StatusCode::ACCEPTED, _) => format!(
            "snapshot build of {function} version {version} under way (not waited for); \
             follow it with: nimbus snapshot list {function}"
        ),
        (StatusCode::CREATED, _) => {
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
fn snapshot_details(s: &Value) -> String {
    let mut pairs = vec![
        ("id", text(&s["id"])),
        ("version", text(&s["version"])),
        ("status", text(&s["status"])),
        ("resident", yes_no(&s["resident"])),
    ];
    if !s["error_message"].is_null() {
        pairs.push(("error", text(&s["error_message"])));
    }
    pairs.extend([
        ("driver", text(&s["driver"])),
        ("runtime", text(&s["runtime"])),
        ("memory", format!("{} MB", text(&s["memory_mb"]))),
        ("forks", count_text(&s["fork_count"], &s["avg_fork_ms"])),
        (
            "restores",
            count_text(&s["restore_count"], &s["avg_restore_ms"]),
        ),
        ("failures", failures_text(s)),
        ("created", text(&s["created_at"])),
        ("last used", text(&s["last_used_at"])),
        ("expires", text(&s["expires_at"])),
    ]);
    details(&pairs)
}

fn yes_no(value: &Value) -> String {
    match value.as_bool() {
        Some(true) => "yes".into(),
        Some(false) => "no".into(),
        None => "-".into(),
    }
}

/// `3 (avg 1.4 ms)`, or `0`.
fn count_text(count: &Value, avg: &Value) -> String {
    match count.as_u64().unwrap_or(0) {
        0 => "0".into(),
        count => format!("{count} (avg {})", avg_ms(avg)),
    }
}

/// `2, the last corrupt at <time>: <why>`, or `0`.
fn failures_text(s: &Value) -> String {
    let count = s["failure_count"].as_u64().unwrap_or(0);
    let last = &s["last_failure"];
    if count == 0 || last.is_null() {
        return count.to_string();
    }
    format!(
        "{count}, the last {} at {}: {}",
        text(&last["status"]),
        text(&last["at"]),
        one_line(last["message"].as_str().unwrap_or("-"))
    )
}

/// `3 (1.4 ms)` for a table cell, or `0`.
fn short_count_text(count: &Value, avg: &Value) -> String {
    match count.as_u64().unwrap_or(0) {
        0 => "0".into(),
        count => format!("{count} ({})", avg_ms(avg)),
    }
}

/// `1.4 ms`.
fn avg_ms(value: &Value) -> String {
    match value.as_f64() {
        Some(ms) => format!("{ms:.1} ms"),
        None => "-".into(),
    }
}

/// The snapshots of `{"snapshots":[…]}` as a table; the error of a failed or corrupt one
/// on the line below it.
fn list_table(list: &Value) -> String {
    let snapshots = list["snapshots"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
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
            text(&s["id"]),
            text(&s["version"]),
            text(&s["status"]),
            yes_no(&s["resident"]),
            short_count_text(&s["fork_count"], &s["avg_fork_ms"]),
            short_count_text(&s["restore_count"], &s["avg_restore_ms"]),
            text(&s["failure_count"]),
            text(&s["last_used_at"]),
            text(&s["expires_at"]),
        ]);
    }
    let rendered = table.render();
    let mut lines = rendered.lines();
    let mut out = String::new();
    if let Some(header) = lines.next() {
        out.push_str(header);
        out.push('\n');
    }
    for (line, s) in lines.zip(snapshots) {
        out.push_str(line);
        out.push('\n');
        if let Some(error) = s["error_message"].as_str() {
            out.push_str(&format!("  └ error: {}\n", one_line(error)));
        } else if s["failure_count"].as_u64().unwrap_or(0) > 0 {
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
async fn function_names(client: &Client, snapshots: &Value) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for s in snapshots.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(id) = s["function_id"].as_str() else {
            continue;
        };
        if names.contains_key(id) {
            continue;
        }
        let name = match client
            .get(&format!("/functions/{}", segment(id)), &[])
            .await
        {
            Ok(f) => f["name"].as_str().unwrap_or(id).to_owned(),
            Err(_) => id.to_owned(),
        };
        names.insert(id.to_owned(), name);
    }
    names
}

/// What a cleanup removed (or would remove), as a headline and a table.
fn cleanup_text(cleanup: &Value, names: &BTreeMap<String, String>) -> String {
    let dry = cleanup["dry_run"].as_bool().unwrap_or(false);
    let removed = cleanup["removed"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
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
    let freed = bytes_text(cleanup["freed_bytes"].as_u64().unwrap_or(0));
    let headline = if dry {
        format!("would remove {count} ({freed} on disk); run without --dry-run to remove them")
    } else {
        format!("removed {count} (freed {freed} on disk)")
    };
    let mut table = Table::new(&["id", "function", "version", "status", "reason"]);
    for s in removed {
        let function = s["function_id"].as_str().unwrap_or_default();
        let reason = match (s["status"].as_str(), s["error_message"].as_str()) {
            (_, Some(error)) => error.to_owned(),
            (Some("ready"), None) => format!("expired at {}", text(&s["expires_at"])),
            _ => "-".into(),
        };
        table.row([
            text(&s["id"]),
            names
                .get(function)
                .cloned()
                .unwrap_or_else(|| function.to_owned()),
            text(&s["version"]),
            text(&s["status"]),
            reason,
        ]);
    }
    format!("{headline}\n\n{}", table.render())
}

/// The stats as `key: value` lines.
fn stats_text(stats: &Value) -> String {
    let by_status: Vec<String> = stats["by_status"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(status, n)| format!("{status} {n}"))
                .collect()
        })
        .unwrap_or_default();
    let total = text(&stats["total"]);
    let snapshots = if by_status.is_empty() {
        total
    } else {
        format!("{total} ({})", by_status.join(", "))
    };
    let bytes = |key: &str| bytes_text(stats[key].as_u64().unwrap_or(0));
    details(&[
        ("snapshots", snapshots),
        (
            "resident templates",
            format!(
                "{} ({} of a {} budget)",
                text(&stats["resident_templates"]),
                bytes("resident_bytes"),
                bytes("memory_budget_bytes")
            ),
        ),
        ("storage", format!("{} on disk", bytes("storage_bytes"))),
        ("forks", count_text(&stats["forks"], &stats["avg_fork_ms"])),
        (
            "restores",
            count_text(&stats["restores"], &stats["avg_restore_ms"]),
        ),
        ("failures", text(&stats["failures"])),
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

    fn snapshot(status: &str, error: Option<&str>) -> Value {
        json!({
            "id": "snap_1", "function_id": "fn_1", "version": 3, "status": status,
            "error_message": error, "resident": status == "ready", "driver": "process",
            "runtime": "python3.11", "memory_mb": 256,
            "fork_count": if status == "ready" { 7 } else { 0 }, "avg_fork_ms": 4.0,
            "restore_count": if status == "ready" { 2 } else { 0 },
            "avg_restore_ms": 81.25, "created_at": "t0", "last_used_at": null,
            "expires_at": "t9",
            "failure_count": if status == "ready" { 1 } else { 2 },
            "last_failure": {"status": "corrupt", "at": "t1", "message": "a file\nis missing"}
        })
    }

    #[test]
    fn list_puts_errors_under_their_rows() {
        let list = json!({"snapshots": [
            snapshot("ready", None),
            snapshot("failed", Some("RuntimeError: no\nmore")),
        ]});
        assert_eq!(
            list_table(&list),
            "ID      VERSION  STATUS  RESIDENT  FORKS       RESTORES     FAILURES  LAST USED  EXPIRES\n\
             snap_1  3        ready   yes       7 (4.0 ms)  2 (81.2 ms)  1         -          t9\n  \
             └ failures: 1, the last corrupt at t1: a file is missing\n\
             snap_1  3        failed  no        0           0            2         -          t9\n  \
             └ error: RuntimeError: no more\n"
        );
        assert_eq!(list_table(&json!({"snapshots": []})), "no snapshots\n");
    }

    #[test]
    fn build_headlines_follow_the_answer() {
        let ready = snapshot("ready", None);
        assert_eq!(
            build_headline("shop", StatusCode::CREATED, &ready, 1.234),
            "built snapshot of shop version 3 in 1.2 s"
        );
        assert!(build_headline("shop", StatusCode::OK, &ready, 0.0).contains("ready already"));
        assert!(build_headline(
            "shop",
            StatusCode::ACCEPTED,
            &snapshot("building", None),
            0.0
        )
        .contains("under way"));
        assert_eq!(
            build_headline("shop", StatusCode::OK, &snapshot("failed", Some("x")), 0.0),
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
        let dry = json!({"dry_run": true, "freed_bytes": 2048,
            "removed": [snapshot("failed", Some("RuntimeError: no"))]});
        assert_eq!(
            cleanup_text(&dry, &names),
            "would remove 1 snapshot (2.0 KiB on disk); run without --dry-run to remove them\n\n\
             ID      FUNCTION  VERSION  STATUS  REASON\n\
             snap_1  shop      3        failed  RuntimeError: no\n"
        );
        let none = json!({"dry_run": false, "freed_bytes": 0, "removed": []});
        assert!(cleanup_text(&none, &names).starts_with("nothing to clean up"));
    }

    #[test]
    fn stats_show_nonzero_statuses_and_sizes() {
        let stats = json!({"total": 3, "by_status": {"building": 0, "failed": 1, "ready": 2},
            "resident_templates": 2, "resident_bytes": 3 << 20,
            "memory_budget_bytes": 1u64 << 30, "storage_bytes": 0,
            "forks": 9, "avg_fork_ms": 3.5, "restores": 4, "avg_restore_ms": 81.5,
            "failures": 1});
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
