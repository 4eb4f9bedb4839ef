//! `nimbus session list|get|delete` and `nimbus state get|delete`: the sessions of a
//! stateful function and what its state holds (SPEC §3 "Sessions and state").

use clap::{Args, Subcommand};
use nimbus_client::{SessionList, SessionState, StateView};
use serde_json::json;

use super::table::{details, Table};
use super::{dash, opt, print_json, CliError, Connection};

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
    let client = args.conn.client()?;
    let json = args.conn.json();
    match args.command {
        SessionCommand::List { function, limit } => {
            let list = client.list_sessions(&function, limit).await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", sessions_table(&list));
            }
        }
        SessionCommand::Get { function, session } => {
            let found = client.get_session(&function, &session).await?;
            if json {
                print_json(&found);
            } else {
                print!("{}", session_text(&found));
            }
        }
        SessionCommand::Delete { function, session } => {
            client.delete_session(&function, &session).await?;
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
    let client = args.conn.client()?;
    let json = args.conn.json();
    match args.command {
        StateCommand::Get { function, session } => {
            let state = client.get_state(&function, &session, true).await?;
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
            let deleted = client
                .delete_state(&function, &session, key.as_deref())
                .await?;
            if json {
                print_json(&deleted);
            } else {
                match key {
                    Some(key) => println!("deleted key {key:?} of {session}'s state"),
                    None => println!("deleted {} key(s) of {session}'s state", deleted.deleted),
                }
            }
        }
    }
    Ok(())
}

fn sessions_table(list: &SessionList) -> String {
    let mut table = Table::new(&["session", "instance", "last access", "expires", "created"]);
    for s in &list.sessions {
        table.row([
            dash(&s.session_key),
            opt(&s.instance_id),
            dash(&s.last_access),
            dash(&s.expires_at),
            dash(&s.created_at),
        ]);
    }
    if table.is_empty() {
        return "no live sessions\n".to_owned();
    }
    table.text()
}

fn session_text(state: &SessionState) -> String {
    let session = &state.session;
    let keys: Vec<String> = state
        .keys
        .iter()
        .map(|k| format!("{} ({} B)", dash(&k.key), k.size))
        .collect();
    details(&[
        ("session", dash(&session.session_key)),
        ("function", dash(&session.function_id)),
        ("instance", opt(&session.instance_id)),
        ("created", dash(&session.created_at)),
        ("last access", dash(&session.last_access)),
        ("expires", dash(&session.expires_at)),
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
fn ttl_text(ttl_ms: Option<u64>) -> String {
    match ttl_ms {
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
        None => "-".to_owned(),
    }
}

fn state_table(state: &StateView) -> String {
    let mut table = Table::new(&["key", "value", "size", "ttl", "version"]);
    for k in &state.keys {
        table.row([
            dash(&k.info.key),
            k.value.clone().unwrap_or_default().to_string(),
            format!("{} B", k.info.size),
            ttl_text(k.info.ttl_ms),
            k.info.version.to_string(),
        ]);
    }
    let scope = match state.scope.as_str() {
        "function" => "the function's state".to_owned(),
        _ => format!("session {}", dash(&state.session_key)),
    };
    if table.is_empty() {
        return format!("{scope}: no keys\n");
    }
    format!(
        "{scope}: {} key(s), {} B\n{}",
        state.keys.len(),
        state.total_size,
        table.text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_shown_as_a_table_with_sizes_and_ttls() {
        let view = |v| serde_json::from_value::<StateView>(v).unwrap();
        let state = view(json!({
            "function_id": "fn_1", "session_key": "u1", "scope": "session", "total_size": 9,
            "keys": [
                {"key": "cart", "size": 7, "ttl_ms": 3_599_500, "version": 3, "value": [1, 2]},
                {"key": "n", "size": 2, "ttl_ms": null, "version": 4, "value": 12}
            ]
        }));
        let text = state_table(&state);
        assert!(text.starts_with("session u1: 2 key(s), 9 B\n"), "{text}");
        assert!(text.contains("cart  [1,2]  7 B   3599.5 s  3"), "{text}");
        assert!(text.contains("n     12     2 B   -         4"), "{text}");
        let empty = view(json!({"scope": "function", "session_key": "_global", "keys": []}));
        assert_eq!(state_table(&empty), "the function's state: no keys\n");
    }

    #[test]
    fn sessions_list_shows_bindings() {
        let list: SessionList = serde_json::from_value(json!({"sessions": [{
            "session_key": "u1", "instance_id": "i_1", "last_access": "2026-11-28T08:00:00Z",
            "expires_at": "2026-11-28T09:00:00Z", "created_at": "2026-11-28T07:00:00Z"
        }]}))
        .unwrap();
        let text = sessions_table(&list);
        assert!(text.starts_with("SESSION  INSTANCE  LAST ACCESS"), "{text}");
        assert!(text.contains("u1       i_1"), "{text}");
        assert_eq!(
            sessions_table(&SessionList::default()),
            "no live sessions\n"
        );
    }
}
