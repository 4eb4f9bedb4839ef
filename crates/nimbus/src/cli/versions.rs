//! `nimbus version publish|list|get|delete`: a function's immutable versions.

use clap::{Args, Subcommand};
use nimbus_client::{PublishRequest, Version, VersionPage};

use super::table::{details, files_text, page_note, Table};
use super::{dash, opt, print_json, CliError, Connection};

/// `nimbus version …`.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Server, API key and output format (accepted after the subcommand too).
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: VersionCommand,
}

/// The subcommands of `nimbus version`.
#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// Publish the function's current code and configuration as a new version and move
    /// `latest` to it (nothing is published when nothing changed since the last version).
    Publish {
        /// Function name or id.
        function: String,
        /// What this version is.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Also route this alias entirely to the new version.
        #[arg(long, value_name = "NAME")]
        alias: Option<String>,
    },
    /// List versions, newest first.
    List {
        /// Function name or id.
        function: String,
        /// Most versions shown.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Versions skipped first.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Show one version: its configuration, files and the aliases routing to it.
    Get {
        /// Function name or id.
        function: String,
        /// Version number.
        version: u32,
        /// Also print the content of every text file.
        #[arg(long)]
        code: bool,
    },
    /// Delete a version no alias routes to.
    Delete {
        /// Function name or id.
        function: String,
        /// Version number.
        version: u32,
    },
}

/// Runs `nimbus version …`.
pub async fn run(args: VersionArgs) -> Result<(), CliError> {
    let client = args.conn.client()?;
    let json = args.conn.json();
    match args.command {
        VersionCommand::Publish {
            function,
            description,
            alias,
        } => {
            let request = PublishRequest {
                description,
                publish_alias: alias.clone(),
            };
            // `created` false: nothing changed, the answer is the last version.
            let published = client.publish_version(&function, &request).await?;
            if json {
                print_json(&published);
            } else {
                println!(
                    "{}",
                    publish_summary(
                        &function,
                        &published.version,
                        published.created,
                        alias.as_deref()
                    )
                );
            }
        }
        VersionCommand::List {
            function,
            limit,
            offset,
        } => {
            let page = client.list_versions(&function, limit, offset).await?;
            if json {
                print_json(&page);
            } else {
                let (table, shown) = list_table(&page);
                print!("{table}");
                if let Some(note) = page_note(&page.page, shown) {
                    eprintln!("{note}");
                }
            }
        }
        VersionCommand::Get {
            function,
            version,
            code,
        } => {
            let v = client.get_version(&function, version).await?;
            if json {
                print_json(&v);
            } else {
                print!("{}", version_details(&v));
                if code {
                    print!("{}", file_contents(&v));
                }
            }
        }
        VersionCommand::Delete { function, version } => {
            let deleted = client.delete_version(&function, version).await?;
            if json {
                print_json(&deleted);
            } else {
                println!("deleted {function} version {}", deleted.version);
            }
        }
    }
    Ok(())
}

/// `published my-fn version 3 (latest → 3, prod → 3)`, or that nothing changed. Either way
/// the server has moved `latest` and the `--alias` to the version, so both are named.
fn publish_summary(
    function: &str,
    version: &Version,
    created: bool,
    alias: Option<&str>,
) -> String {
    let number = version.version;
    let moved = std::iter::once(nimbus_core::LATEST_ALIAS)
        .chain(alias)
        .map(|a| format!("{a} → {number}"))
        .collect::<Vec<_>>()
        .join(", ");
    if created {
        format!("published {function} version {number} ({moved})")
    } else {
        format!(
            "{function}: nothing changed since version {number}; no new version published ({moved})"
        )
    }
}

/// `sha256:0123456789abcdef…` → `0123456789ab`: enough to tell versions apart at a glance.
fn short_hash(hash: &str) -> String {
    let full = dash(hash);
    let hex = full.strip_prefix("sha256:").unwrap_or(&full);
    hex.chars().take(12).collect()
}

/// The versions table and how many rows it has.
fn list_table(page: &VersionPage) -> (String, usize) {
    let mut table = Table::new(&[
        "version",
        "created",
        "by",
        "code hash",
        "aliases",
        "description",
    ]);
    for v in &page.versions {
        let aliases = aliases_text(v, ",");
        table.row([
            v.version.to_string(),
            dash(&v.created_at),
            dash(&v.created_by),
            short_hash(&v.code_hash),
            if aliases.is_empty() {
                "-".into()
            } else {
                aliases
            },
            dash(&v.description),
        ]);
    }
    if table.is_empty() {
        ("no versions\n".into(), 0)
    } else {
        (table.text(), page.versions.len())
    }
}

/// The aliases routing to a version, joined.
fn aliases_text(v: &Version, separator: &str) -> String {
    v.aliases
        .iter()
        .map(|a| dash(a))
        .collect::<Vec<_>>()
        .join(separator)
}

/// The details view of one version.
fn version_details(v: &Version) -> String {
    let files = files_text(v.files.as_deref().unwrap_or_default());
    // Names only: values may be secrets, and `--output json` shows them when wanted.
    let env = v.env_vars.keys().cloned().collect::<Vec<_>>().join(" ");
    let aliases = aliases_text(v, ", ");
    let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    details(&[
        ("version", v.version.to_string()),
        ("description", dash(&v.description)),
        ("runtime", dash(&v.runtime)),
        ("handler", dash(&v.handler)),
        ("memory", format!("{} MB", v.memory_mb)),
        ("timeout", format!("{} s", v.timeout_sec)),
        (
            "code",
            format!("{} ({} B)", dash(&v.code_hash), opt(&v.code_size)),
        ),
        ("files", or_dash(files)),
        ("env", or_dash(env)),
        ("aliases", or_dash(aliases)),
        ("created", dash(&v.created_at)),
        ("created by", dash(&v.created_by)),
    ])
}

/// Every text file under a `==> path <==` header; binary files are only named.
fn file_contents(v: &Version) -> String {
    let mut out = String::new();
    for file in v.files.as_deref().unwrap_or_default() {
        let path = dash(&file.path);
        match &file.content {
            Some(content) => {
                out.push_str(&format!("\n==> {path} <==\n{content}"));
                if !content.is_empty() && !content.ends_with('\n') {
                    out.push('\n');
                }
            }
            None => out.push_str(&format!(
                "\n==> {path} <==\n(binary, {} B, not shown)\n",
                file.size
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn version() -> Version {
        serde_json::from_value(json!({
            "function_id": "fn_1", "version": 3, "description": "canary",
            "runtime": "python3.11", "handler": "handler.handle",
            "code_hash": "sha256:0123456789abcdef0123", "code_size": 40,
            "memory_mb": 256, "timeout_sec": 30, "env_vars": {"B": "2", "A": "secret"},
            "created_at": "2025-01-02T03:04:05Z", "created_by": "admin",
            "aliases": ["latest", "prod"],
            "files": [
                {"path": "handler.py", "size": 30, "content": "def handle(e):\n    return 1"},
                {"path": "data.bin", "size": 10, "content_base64": "AAEC"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn publish_names_the_moved_aliases_or_that_nothing_changed() {
        assert_eq!(
            publish_summary("my-fn", &version(), true, Some("prod")),
            "published my-fn version 3 (latest → 3, prod → 3)"
        );
        assert_eq!(
            publish_summary("my-fn", &version(), false, None),
            "my-fn: nothing changed since version 3; no new version published (latest → 3)"
        );
    }

    #[test]
    fn list_shortens_hashes_and_joins_aliases() {
        let page = VersionPage {
            versions: vec![version()],
            ..VersionPage::default()
        };
        let (table, shown) = list_table(&page);
        assert_eq!(shown, 1);
        assert_eq!(
            table,
            "VERSION  CREATED               BY     CODE HASH     ALIASES      DESCRIPTION\n\
             3        2025-01-02T03:04:05Z  admin  0123456789ab  latest,prod  canary\n"
        );
        let (empty, shown) = list_table(&VersionPage::default());
        assert_eq!((empty.as_str(), shown), ("no versions\n", 0));
    }

    #[test]
    fn details_hide_env_values() {
        let text = version_details(&version());
        assert!(text.contains("env:         A B\n"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("aliases:     latest, prod\n"), "{text}");
        assert!(
            text.contains("files:       handler.py (30 B), data.bin (10 B)\n"),
            "{text}"
        );
    }

    #[test]
    fn code_prints_text_files_under_headers() {
        assert_eq!(
            file_contents(&version()),
            "\n==> handler.py <==\ndef handle(e):\n    return 1\n\
             \n==> data.bin <==\n(binary, 10 B, not shown)\n"
        );
    }
}
