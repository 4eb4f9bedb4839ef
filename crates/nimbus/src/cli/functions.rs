//! `nimbus fn list|get|delete`: the functions on a server.

use std::io::{BufRead, IsTerminal, Write};

use clap::{Args, Subcommand};
use nimbus_client::{Function, FunctionPage};
use nimbus_core::StateConfig;

use super::table::{details, files_text, page_note, Table};
use super::{dash, print_json, CliError, Connection};

/// `nimbus fn …`.
#[derive(Debug, Args)]
pub struct FnArgs {
    /// Server, API key and output format (accepted after the subcommand too).
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: FnCommand,
}

/// The subcommands of `nimbus fn`.
#[derive(Debug, Subcommand)]
pub enum FnCommand {
    /// List functions.
    List {
        /// Most functions shown.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Functions skipped first.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Show one function.
    Get {
        /// Function name or id.
        function: String,
    },
    /// Delete a function with all its versions and aliases.
    Delete {
        /// Function name or id.
        function: String,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
    },
}

/// Runs `nimbus fn …`.
pub async fn run(args: FnArgs) -> Result<(), CliError> {
    let client = args.conn.client()?;
    let json = args.conn.json();
    match args.command {
        FnCommand::List { limit, offset } => {
            let page = client.list_functions(limit, offset).await?;
            if json {
                print_json(&page);
            } else {
                list_table(&page);
            }
        }
        FnCommand::Get { function } => {
            let f = client.get_function(&function).await?;
            if json {
                print_json(&f);
            } else {
                print!("{}", function_details(&f));
            }
        }
        FnCommand::Delete { function, yes } => {
            if !yes
                && !confirm(&format!(
                    "Delete function {function:?} with all its versions and aliases?"
                ))?
            {
                return Err(CliError::Usage(
                    "aborted: the function was not deleted".into(),
                ));
            }
            let deleted = client.delete_function(&function).await?;
            if json {
                print_json(&deleted);
            } else {
                println!(
                    "deleted function {} ({})",
                    dash(&deleted.name),
                    dash(&deleted.id)
                );
            }
        }
    }
    Ok(())
}

/// Asks on the terminal; without one, refuses and says to pass `--yes`.
fn confirm(question: &str) -> Result<bool, CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "refusing to delete without confirmation: stdin is not a terminal; pass --yes".into(),
        ));
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::Usage(format!("reading the answer: {e}")))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

/// `on: values ≤ 65536 B, ≤ 100 keys, no default TTL; affinity on (sessions last 3600 s)`,
/// or `off`.
pub fn state_text(config: &StateConfig) -> String {
    if !config.enabled && !config.session_affinity {
        return "off".to_owned();
    }
    let ttl = match config.default_ttl {
        0 => "no default TTL".to_owned(),
        ttl => format!("default TTL {ttl} s"),
    };
    let affinity = match config.session_affinity {
        true => format!("affinity on (sessions last {} s)", config.session_timeout),
        false => "affinity off".to_owned(),
    };
    format!(
        "{}: values ≤ {} B, ≤ {} keys, {ttl}; {affinity}",
        if config.enabled { "on" } else { "off" },
        config.max_state_size,
        config.max_keys,
    )
}

fn list_table(page: &FunctionPage) {
    let mut table = Table::new(&[
        "name", "id", "runtime", "version", "memory", "timeout", "status", "updated",
    ]);
    for f in &page.functions {
        table.row([
            dash(&f.name),
            dash(&f.id),
            dash(&f.runtime),
            f.latest_version.to_string(),
            format!("{} MB", f.memory_mb),
            format!("{} s", f.timeout_sec),
            dash(&f.status),
            dash(&f.updated_at),
        ]);
    }
    if table.is_empty() {
        println!("no functions");
    } else {
        print!("{}", table.text());
    }
    if let Some(note) = page_note(&page.page, page.functions.len()) {
        eprintln!("{note}");
    }
}

/// The details view of one function.
fn function_details(f: &Function) -> String {
    let files = files_text(&f.files);
    let env = f
        .env_vars
        .iter()
        .map(|(k, v)| format!("{k}={}", dash(v)))
        .collect::<Vec<_>>()
        .join(" ");
    details(&[
        ("name", dash(&f.name)),
        ("id", dash(&f.id)),
        ("description", dash(&f.description)),
        ("runtime", dash(&f.runtime)),
        ("handler", dash(&f.handler)),
        ("status", dash(&f.status)),
        ("latest version", f.latest_version.to_string()),
        ("memory", format!("{} MB", f.memory_mb)),
        ("timeout", format!("{} s", f.timeout_sec)),
        ("max instances", f.max_instances.to_string()),
        ("network", dash(&f.network)),
        ("state", state_text(&f.state_config)),
        (
            "code",
            format!("{} ({} B)", dash(&f.code_hash), f.code_size),
        ),
        ("files", if files.is_empty() { "-".into() } else { files }),
        ("env", if env.is_empty() { "-".into() } else { env }),
        ("created", dash(&f.created_at)),
        ("updated", dash(&f.updated_at)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn details_show_files_and_env() {
        let f: Function = serde_json::from_value(json!({
            "name": "hello", "id": "fn_1", "description": "", "runtime": "python3.11",
            "handler": "handler.handle", "status": "active", "latest_version": 2,
            "memory_mb": 256, "timeout_sec": 30, "max_instances": 50,
            "code_hash": "sha256:ab", "code_size": 12,
            "files": [{"path": "handler.py", "size": 12}],
            "env_vars": {"A": "1"}, "created_at": "t0", "updated_at": "t1"
        }))
        .unwrap();
        let text = function_details(&f);
        assert!(text.contains("description:    -\n"), "{text}");
        assert!(
            text.contains("files:          handler.py (12 B)\n"),
            "{text}"
        );
        assert!(text.contains("env:            A=1\n"), "{text}");
        assert!(text.contains("state:          off\n"), "{text}");
    }

    #[test]
    fn state_config_reads_as_one_line() {
        let state = |v| serde_json::from_value::<StateConfig>(v).unwrap();
        let on = state(
            json!({"enabled": true, "default_ttl": 60, "max_state_size": 65536,
            "max_keys": 100, "session_affinity": true, "session_timeout": 3600}),
        );
        assert_eq!(
            state_text(&on),
            "on: values ≤ 65536 B, ≤ 100 keys, default TTL 60 s; affinity on (sessions last 3600 s)"
        );
        let plain = state(
            json!({"enabled": true, "default_ttl": 0, "max_state_size": 10,
            "max_keys": 5, "session_affinity": false, "session_timeout": 3600}),
        );
        assert_eq!(
            state_text(&plain),
            "on: values ≤ 10 B, ≤ 5 keys, no default TTL; affinity off"
        );
        assert_eq!(state_text(&state(json!({"enabled": false}))), "off");
    }
}
