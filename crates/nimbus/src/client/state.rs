//! `nimbus session list|get|delete` and `nimbus state get|delete`: the sessions of a
//! stateful function and what its state holds (SPEC §3 "Sessions and state").

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::http::segment;
use super::table::{details, Table};
use super::{print_json, text, CliError, Client, Connection, Output};

/// `nimbus session …`.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Server, API key and output format (accepted after the subcommand too).
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: SessionCommand,
}

/// The subcommands of `nimbus session`.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// List a function's live sessions, most recently used first.
    List {
        /// Function name or id.
        function: String,
        /// Most sessions shown.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show a session: its instance binding, timestamps and state keys.
    Get {
        /// Function name or id.
        function: String,
        /// Session key.
        session: String,
    },
    /// Unbind a session and delete its state.
    Delete {
        /// Function name or id.
        function: String,
        /// Session key.
        session: String,
    },
}

/// `nimbus state …`.
#[derive(Debug, Args)]
pub struct StateArgs {
    /// Server, API key and output format (accepted after the subcommand too).
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: StateCommand,
}

/// The subcommands of `nimbus state`.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Show a session's state (or the function's, with `_global`): every key with its
    /// value, size, time left to live and version.
    Get {
        /// Function name or id.
        function: String,
        /// Session key, or `_global` for the function's own state.
        session: String,
    },
    /// Delete one key of a session's state (or the function's, `_global`), or all of them.
    Delete {
        /// Function name or id.
        function: String,
        /// Session key, or `_global`.
        session: String,
        /// The key to delete; without it, every key.
        #[arg(long)]
        key: Option<String>,
    },
}

/// Runs `nimbus session …`.
pub async fn run_session(args: SessionArgs) -> Result<(), CliError> {
    let client = Client::from_connection(&args.conn)?;
    let json = args.conn.output == Output::Json;
    match args.command {
        SessionCommand::List { function, limit } => {
            let list = client
                .get(
                    &format!("/functions/{}/sessions", segment(&function)),
                    &[("limit", limit.to_string())],
                )
                .await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", sessions_table(&list));
            }
        }
        SessionCommand::Get { function, session } => {
            let found = client.get(&session_path(&function, &session), &[]).await?;
            if json {
                print_json(&found);
            } else {
                print!("{}", session_text(&found));
            }
        }
        SessionCommand::Delete { function, session } => {
            client.delete(&session_path(&function, &session)).await?;
            if json {
                print_json(&json!({ "deleted": true, "session_key": session }));
            } else {
                println!("deleted session {session} of {function} and its state");
            }
        }
    }
    Ok(())
}

/// Runs `nimbus state …`.
pub async fn run_state(args: StateArgs) -> Result<(), CliError> {
    let client = Client::from_connection(&args.conn)?;
    let json = args.conn.output == Output::Json;
    match args.command {
        StateCommand::Get { function, session } => {
            let state = client
                .get(
                    &state_path(&function, &session),
                    &[("values", "true".to_owned())],
                )
                .await?;
            if json {
                print_json(&state);
            } else {
                print!("{}", state_table(&state));
            }
        }
        StateCommand::Delete {
            function,
            session,
            key,
        } => {
            let mut query = Vec::new();
            if let Some(key) = &key {
                query.push(("key", key.clone()));
            }
            let deleted = client
                .send(
                    reqwest::Method::DELETE,
                    &state_path(&function, &session),
                    &query,
                    None,
                )
                .await?
                .into_result()?;
            if json {
                print_json(&deleted);
            } else {
                let n = deleted["deleted"].as_u64().unwrap_or(0);
                match key {
                    Some(key) => println!("deleted key {key:?} of {session}'s state"),
                    None => println!("deleted {n} key(s) of {session}'s state"),
                }
            }
        }
    }
    Ok(())
}

fn session_path(function: &str, session: &str) -> String {
    format!(
        "/functions/{}/sessions/{}",
        segment(function),
        segment(session)
    )
}

fn state_path(function: &str, session: &str) -> String {
    format!(
        "/functions/{}/state/{}",
        segment(function),
        segment(session)
    )
}

fn sessions_table(list: &Value) -> String {
    let mut table = Table::new(&["session", "instance", "last access", "expires", "created"]);
    for s in list["sessions"].as_array().into_iter().flatten() {
        table.row([
            text(&s["session_key"]),
            text(&s["instance_id"]),
            text(&s["last_access"]),
            text(&s["expires_at"]),
            text(&s["created_at"]),
        ]);
    }
    if table.is_empty() {
        return "no live sessions\n".to_owned();
    }
    table.render()
}

fn session_text(session: &Value) -> String {
    let keys: Vec<String> = session["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| format!("{} ({} B)", text(&k["key"]), k["size"]))
        .collect();
    details(&[
        ("session", text(&session["session_key"])),
        ("function", text(&session["function_id"])),
        ("instance", text(&session["instance_id"])),
        ("created", text(&session["created_at"])),
        ("last access", text(&session["last_access"])),
        ("expires", text(&session["expires_at"])),
        (
            "keys",
            if keys.is_empty() {
                "-".to_owned()
            } else {
                keys.join(", ")
            },
        ),
    ])
}

/// `12.5 s`, `-` for none.
fn ttl_text(ttl_ms: &Value) -> String {
    match ttl_ms.as_u64() {
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
        None => "-".to_owned(),
    }
}

fn state_table(state: &Value) -> String {
    let mut table = Table::new(&["key", "value", "size", "ttl", "version"]);
    for k in state["keys"].as_array().into_iter().flatten() {
        table.row([
            text(&k["key"]),
            k["value"].to_string(),
            format!("{} B", k["size"]),
            ttl_text(&k["ttl_ms"]),
            text(&k["version"]),
        ]);
    }
    let scope = match state["scope"].as_str() {
        Some("function") => "the function's state".to_owned(),
        _ => format!("session {}", text(&state["session_key"])),
    };
    if table.is_empty() {
        return format!("{scope}: no keys\n");
    }
    format!(
        "{scope}: {} key(s), {} B\n{}",
        state["keys"].as_array().map_or(0, Vec::len),
        state["total_size"],
        table.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_shown_as_a_table_with_sizes_and_ttls() {
        let state = json!({
            "function_id": "fn_1", "session_key": "u1", "scope": "session", "total_size": 9,
            "keys": [
                {"key": "cart", "size": 7, "ttl_ms": 3_599_500, "version": 3, "value": [1, 2]},
                {"key": "n", "size": 2, "ttl_ms": null, "version": 4, "value": 12}
            ]
        });
        let text = state_table(&state);
        assert!(text.starts_with("session u1: 2 key(s), 9 B\n"), "{text}");
        assert!(text.contains("cart  [1,2]  7 B   3599.5 s  3"), "{text}");
        assert!(text.contains("n     12     2 B   -         4"), "{text}");
        let empty = json!({"scope": "function", "session_key": "_global", "keys": []});
        assert_eq!(state_table(&empty), "the function's state: no keys\n");
    }

    #[test]
    fn sessions_list_shows_bindings() {
        let list = json!({"sessions": [{
            "session_key": "u1", "instance_id": "i_1", "last_access": "2026-11-28T08:00:00Z",
            "expires_at": "2026-11-28T09:00:00Z", "created_at": "2026-11-28T07:00:00Z"
        }]});
        let text = sessions_table(&list);
        assert!(text.starts_with("SESSION  INSTANCE  LAST ACCESS"), "{text}");
        assert!(text.contains("u1       i_1"), "{text}");
        assert_eq!(
            sessions_table(&json!({"sessions": []})),
            "no live sessions\n"
        );
    }
}
