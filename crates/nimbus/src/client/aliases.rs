//! `nimbus alias create|list|get|set|delete|history|rollback`: a function's aliases and their
//! weighted routing, and the one-liner `nimbus rollback` for when a release goes wrong.

use clap::{ArgGroup, Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use super::http::segment;
use super::routing::{compact_json, routing_of, split_table, RoutingArgs};
use super::table::{details, page_note, Table};
use super::{print_json, text, CliError, Client, Connection, Output};

/// `nimbus alias …`.
#[derive(Debug, Args)]
pub struct AliasArgs {
    /// Server, API key and output format (accepted after the subcommand too).
    #[command(flatten)]
    pub conn: Connection,
    /// What to do.
    #[command(subcommand)]
    pub command: AliasCommand,
}

/// The subcommands of `nimbus alias`.
#[derive(Debug, Subcommand)]
pub enum AliasCommand {
    /// Create an alias routing to one version (--version) or splitting traffic (--weights).
    #[command(group(ArgGroup::new("target").required(true).args(["weights", "version"])))]
    Create {
        /// Function name or id.
        function: String,
        /// Alias name (`[a-z][a-z0-9-_]{0,63}`).
        name: String,
        /// Where its traffic goes.
        #[command(flatten)]
        routing: RoutingArgs,
        /// What the alias is for.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
    },
    /// List a function's aliases and their routing (all of them: every page is fetched).
    List {
        /// Function name or id.
        function: String,
    },
    /// Show an alias and its traffic split.
    Get {
        /// Function name or id.
        function: String,
        /// Alias name.
        name: String,
    },
    /// Change an alias's routing and/or description.
    #[command(group(ArgGroup::new("change").required(true).multiple(true)
        .args(["weights", "version", "description"])))]
    Set {
        /// Function name or id.
        function: String,
        /// Alias name.
        name: String,
        /// Where its traffic goes from now on.
        #[command(flatten)]
        routing: RoutingArgs,
        /// New description.
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        /// Apply only if the alias is still at this revision (nobody changed it meanwhile).
        #[arg(long, value_name = "N")]
        expected_revision: Option<u32>,
    },
    /// Delete an alias (`latest` cannot be deleted).
    Delete {
        /// Function name or id.
        function: String,
        /// Alias name.
        name: String,
    },
    /// Show every change of an alias, newest first.
    History {
        /// Function name or id.
        function: String,
        /// Alias name.
        name: String,
        /// Most entries shown.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Entries skipped first.
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Restore an earlier routing: the one before the last routing change, or a given
    /// revision's.
    Rollback {
        /// Function name or id.
        function: String,
        /// Alias name.
        name: String,
        /// Restore the routing of this revision (see `nimbus alias history`).
        #[arg(long, value_name = "N")]
        to_revision: Option<u32>,
        /// Apply only if the alias is still at this revision (nobody changed it meanwhile).
        #[arg(long, value_name = "N")]
        expected_revision: Option<u32>,
    },
}

/// Flags of `nimbus rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Function name or id.
    pub function: String,
    /// The alias to roll back.
    #[arg(long, value_name = "NAME", default_value = nimbus_core::LATEST_ALIAS)]
    pub alias: String,
    /// Route the alias entirely to this version [default: undo the alias's last routing
    /// change].
    #[arg(long, value_name = "VERSION")]
    pub to: Option<u32>,
    /// Apply only if the alias is still at this revision (nobody changed it meanwhile).
    #[arg(long, value_name = "N")]
    pub expected_revision: Option<u32>,
    /// Server, API key and output format.
    #[command(flatten)]
    pub conn: Connection,
}

/// `/functions/{function}/aliases`.
fn aliases_path(function: &str) -> String {
    format!("/functions/{}/aliases", segment(function))
}

/// `/functions/{function}/aliases/{name}`.
fn alias_path(function: &str, name: &str) -> String {
    format!("{}/{}", aliases_path(function), segment(name))
}

/// Runs `nimbus alias …`.
pub async fn run(args: AliasArgs) -> Result<(), CliError> {
    let client = Client::from_connection(&args.conn)?;
    let json = args.conn.output == Output::Json;
    match args.command {
        AliasCommand::Create {
            function,
            name,
            routing,
            description,
        } => {
            let mut body = json!({ "name": name, "routing_config": routing.routing() });
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            let alias = client
                .call(Method::POST, &aliases_path(&function), &body)
                .await?;
            show_change(&alias, json, || {
                format!(
                    "created alias {} of {function} (revision {})",
                    text(&alias["name"]),
                    text(&alias["revision"])
                )
            });
        }
        AliasCommand::List { function } => {
            let list = all_aliases(&client, &function).await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", list_table(&list));
            }
        }
        AliasCommand::Get { function, name } => {
            let alias = client.get(&alias_path(&function, &name), &[]).await?;
            if json {
                print_json(&alias);
            } else {
                print!("{}", alias_details(&alias));
            }
        }
        AliasCommand::Set {
            function,
            name,
            routing,
            description,
            expected_revision,
        } => {
            let mut body = json!({});
            if let Some(revision) = expected_revision {
                body["expected_revision"] = json!(revision);
            }
            if let Some(routing) = routing.routing() {
                body["routing_config"] = json!(routing);
            }
            if let Some(description) = description {
                body["description"] = json!(description);
            }
            let alias = client
                .call(Method::PUT, &alias_path(&function, &name), &body)
                .await?;
            show_change(&alias, json, || {
                format!(
                    "updated alias {} (revision {})",
                    text(&alias["name"]),
                    text(&alias["revision"])
                )
            });
        }
        AliasCommand::Delete { function, name } => {
            let deleted = client.delete(&alias_path(&function, &name)).await?;
            if json {
                print_json(&deleted);
            } else {
                println!("deleted alias {} of {function}", text(&deleted["name"]));
            }
        }
        AliasCommand::History {
            function,
            name,
            limit,
            offset,
        } => {
            let page = client
                .get(
                    &format!("{}/history", alias_path(&function, &name)),
                    &[("limit", limit.to_string()), ("offset", offset.to_string())],
                )
                .await?;
            if json {
                print_json(&page);
            } else {
                let (table, shown) = history_table(&page);
                print!("{table}");
                if let Some(note) = page_note(&page, shown) {
                    eprintln!("{note}");
                }
            }
        }
        AliasCommand::Rollback {
            function,
            name,
            to_revision,
            expected_revision,
        } => {
            let body =
                json!({ "to_revision": to_revision, "expected_revision": expected_revision });
            roll_back(&client, &function, &name, &body, json).await?;
        }
    }
    Ok(())
}

/// Runs `nimbus rollback`: routes the alias entirely to `--to`, or undoes its last routing
/// change.
pub async fn run_rollback(args: RollbackArgs) -> Result<(), CliError> {
    let client = Client::from_connection(&args.conn)?;
    let json = args.conn.output == Output::Json;
    let body = json!({ "to_version": args.to, "expected_revision": args.expected_revision });
    roll_back(&client, &args.function, &args.alias, &body, json).await
}

/// `POST …/rollback` and what the alias routes to afterwards.
async fn roll_back(
    client: &Client,
    function: &str,
    name: &str,
    body: &Value,
    json: bool,
) -> Result<(), CliError> {
    let alias = client
        .call(
            Method::POST,
            &format!("{}/rollback", alias_path(function, name)),
            body,
        )
        .await?;
    show_change(&alias, json, || {
        // A rollback restores a revision's routing, or sends everything to one version.
        let to = match alias["restored_revision"].as_u64() {
            Some(revision) => format!("the routing of revision {revision}"),
            None => format!(
                "version {}",
                text(&alias["routing_config"]["weights"][0]["version"])
            ),
        };
        format!(
            "{} of {function} rolled back to {to} (now revision {})",
            text(&alias["name"]),
            text(&alias["revision"])
        )
    });
    Ok(())
}

/// Prints a changed alias: the server's JSON, or `headline` and the new split.
fn show_change(alias: &Value, json: bool, headline: impl FnOnce() -> String) {
    if json {
        print_json(alias);
    } else {
        print!("{}", change_text(&headline(), alias));
    }
}

/// A one-line summary of a change followed by the alias's split.
fn change_text(headline: &str, alias: &Value) -> String {
    format!("{headline}\n\n{}", split_text(alias))
}

/// The alias's split table, or `-` if its routing is missing.
fn split_text(alias: &Value) -> String {
    routing_of(&alias["routing_config"])
        .map(|r| split_table(&r))
        .unwrap_or_else(|| "-\n".into())
}

/// Aliases asked for per page: a function may have this many, so one page usually does.
const PAGE: usize = nimbus_core::limits::MAX_ALIASES_PER_FUNCTION;

/// Every alias of `function`, page after page: `{"aliases": […], "total": n}`.
async fn all_aliases(client: &Client, function: &str) -> Result<Value, CliError> {
    let mut aliases: Vec<Value> = Vec::new();
    loop {
        let page = client
            .get(
                &aliases_path(function),
                &[
                    ("limit", PAGE.to_string()),
                    ("offset", aliases.len().to_string()),
                ],
            )
            .await?;
        let items = page["aliases"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or(0) as usize;
        let done = items.is_empty();
        aliases.extend(items);
        // An alias deleted meanwhile shortens the total: stop at what is known, never loop.
        if done || aliases.len() >= total {
            return Ok(json!({ "aliases": aliases, "total": aliases.len() }));
        }
    }
}

/// The aliases of `{"aliases":[…]}` as a table.
fn list_table(list: &Value) -> String {
    let mut table = Table::new(&["name", "routing", "revision", "updated", "description"]);
    for a in list["aliases"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        table.row([
            text(&a["name"]),
            compact_json(&a["routing_config"]),
            text(&a["revision"]),
            text(&a["updated_at"]),
            text(&a["description"]),
        ]);
    }
    if table.is_empty() {
        "no aliases\n".into()
    } else {
        table.render()
    }
}

/// The details view of one alias, its split below.
fn alias_details(a: &Value) -> String {
    let fields = details(&[
        ("name", text(&a["name"])),
        ("function", text(&a["function_id"])),
        ("description", text(&a["description"])),
        ("revision", text(&a["revision"])),
        ("created", text(&a["created_at"])),
        ("updated", text(&a["updated_at"])),
    ]);
    format!("{fields}\n{}", split_text(a))
}

/// The history page as a table and how many entries it has.
fn history_table(page: &Value) -> (String, usize) {
    let mut table = Table::new(&["rev", "when", "by", "action", "routing", "previous"]);
    let entries = page["history"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for e in entries {
        let action = match (e["action"].as_str(), e["restored_revision"].as_u64()) {
            (Some("rollback"), Some(r)) => format!("rollback to r{r}"),
            _ => text(&e["action"]),
        };
        table.row([
            text(&e["revision"]),
            text(&e["changed_at"]),
            text(&e["changed_by"]),
            action,
            compact_json(&e["routing_config"]),
            compact_json(&e["previous_routing_config"]),
        ]);
    }
    if table.is_empty() {
        ("no history\n".into(), 0)
    } else {
        (table.render(), entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alias() -> Value {
        json!({
            "function_id": "fn_1", "name": "prod", "description": "",
            "routing_config": {"weights": [{"version": 2, "weight": 90}, {"version": 3, "weight": 10}]},
            "revision": 4, "created_at": "t0", "updated_at": "t1"
        })
    }

    #[test]
    fn list_shows_routing_compactly() {
        assert_eq!(
            list_table(&json!({ "aliases": [alias()] })),
            "NAME  ROUTING          REVISION  UPDATED  DESCRIPTION\n\
             prod  v2 90% · v3 10%  4         t1       -\n"
        );
        assert_eq!(list_table(&json!({"aliases": []})), "no aliases\n");
    }

    #[test]
    fn details_end_with_the_split() {
        let text = alias_details(&alias());
        assert!(text.starts_with("name:        prod\n"), "{text}");
        assert!(
            text.ends_with(&format!(
                "\nVERSION  WEIGHT  SPLIT\n2        90%     {}\n3        10%     █████\n",
                "█".repeat(45)
            )),
            "{text}"
        );
    }

    #[test]
    fn history_names_rollbacks_and_first_entries() {
        let page = json!({"history": [
            {"revision": 2, "action": "rollback", "restored_revision": 1,
             "routing_config": {"weights": [{"version": 1, "weight": 100}]},
             "previous_routing_config": {"weights": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]},
             "changed_by": "admin", "changed_at": "t2", "description": ""},
            {"revision": 1, "action": "create", "restored_revision": null,
             "routing_config": {"weights": [{"version": 1, "weight": 100}]},
             "previous_routing_config": null,
             "changed_by": "admin", "changed_at": "t1", "description": ""}
        ], "total": 2, "limit": 20, "offset": 0});
        let (table, shown) = history_table(&page);
        assert_eq!(shown, 2);
        assert_eq!(
            table,
            "REV  WHEN  BY     ACTION          ROUTING  PREVIOUS\n\
             2    t2    admin  rollback to r1  v1 100%  v1 90% · v2 10%\n\
             1    t1    admin  create          v1 100%  -\n"
        );
    }

    #[test]
    fn changes_print_a_headline_and_the_split() {
        let text = change_text("updated alias prod (revision 4)", &alias());
        assert!(
            text.starts_with("updated alias prod (revision 4)\n\nVERSION  WEIGHT  SPLIT\n"),
            "{text}"
        );
        assert_eq!(split_text(&json!({})), "-\n");
    }
}
