//! `nimbus alias create|list|get|set|delete|history|rollback`: a function's aliases and their
//! weighted routing, and the one-liner `nimbus rollback` for when a release goes wrong.

use clap::{ArgGroup, Args, Subcommand};
use nimbus_client::{Alias, AliasPatch, Client, HistoryPage, NewAlias, Rollback, RollbackRequest};
use nimbus_core::RoutingConfig;
use serde::Serialize;

use super::routing::{compact, split_table, RoutingArgs};
use super::table::{details, page_note, Table};
use super::{dash, print_json, CliError, Connection};

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

/// Runs `nimbus alias …`.
pub async fn run(args: AliasArgs) -> Result<(), CliError> {
    let client = args.conn.client()?;
    let json = args.conn.json();
    match args.command {
        AliasCommand::Create {
            function,
            name,
            routing,
            description,
        } => {
            let routing_config = routing.routing().ok_or_else(|| {
                CliError::Usage("give the alias's routing: --weights or --version".into())
            })?;
            let new = NewAlias {
                name,
                description,
                routing_config,
            };
            let alias = client.create_alias(&function, &new).await?;
            show_change(&alias, json, || {
                format!(
                    "created alias {} of {function} (revision {})",
                    dash(&alias.name),
                    alias.revision
                )
            });
        }
        AliasCommand::List { function } => {
            let list = all_aliases(&client, &function).await?;
            if json {
                print_json(&list);
            } else {
                print!("{}", list_table(&list.aliases));
            }
        }
        AliasCommand::Get { function, name } => {
            let alias = client.get_alias(&function, &name).await?;
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
            let patch = AliasPatch {
                expected_revision,
                routing_config: routing.routing(),
                description,
            };
            let alias = client.update_alias(&function, &name, &patch).await?;
            show_change(&alias, json, || {
                format!(
                    "updated alias {} (revision {})",
                    dash(&alias.name),
                    alias.revision
                )
            });
        }
        AliasCommand::Delete { function, name } => {
            let deleted = client.delete_alias(&function, &name).await?;
            if json {
                print_json(&deleted);
            } else {
                println!("deleted alias {} of {function}", dash(&deleted.name));
            }
        }
        AliasCommand::History {
            function,
            name,
            limit,
            offset,
        } => {
            let page = client
                .alias_history(&function, &name, limit, offset)
                .await?;
            if json {
                print_json(&page);
            } else {
                let (table, shown) = history_table(&page);
                print!("{table}");
                if let Some(note) = page_note(&page.page, shown) {
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
            let req = RollbackRequest {
                to_revision,
                expected_revision,
                ..RollbackRequest::default()
            };
            roll_back(&client, &function, &name, &req, json).await?;
        }
    }
    Ok(())
}

/// Runs `nimbus rollback`: routes the alias entirely to `--to`, or undoes its last routing
/// change.
pub async fn run_rollback(args: RollbackArgs) -> Result<(), CliError> {
    let client = args.conn.client()?;
    let req = RollbackRequest {
        to_version: args.to,
        expected_revision: args.expected_revision,
        ..RollbackRequest::default()
    };
    roll_back(&client, &args.function, &args.alias, &req, args.conn.json()).await
}

/// `POST …/rollback` and what the alias routes to afterwards.
async fn roll_back(
    client: &Client,
    function: &str,
    name: &str,
    req: &RollbackRequest,
    json: bool,
) -> Result<(), CliError> {
    let rolled_back: Rollback = client.rollback_alias(function, name, req).await?;
    if json {
        print_json(&rolled_back);
        return Ok(());
    }
    let alias = &rolled_back.alias;
    // A rollback restores a revision's routing, or sends everything to one version.
    let to = match rolled_back.restored_revision {
        Some(revision) => format!("the routing of revision {revision}"),
        None => format!(
            "version {}",
            alias
                .routing_config
                .weights
                .first()
                .map_or("-".to_owned(), |w| w.version.to_string())
        ),
    };
    let headline = format!(
        "{} of {function} rolled back to {to} (now revision {})",
        dash(&alias.name),
        alias.revision
    );
    print!("{}", change_text(&headline, alias));
    Ok(())
}

/// Prints a changed alias: the server's JSON, or `headline` and the new split.
fn show_change(alias: &Alias, json: bool, headline: impl FnOnce() -> String) {
    if json {
        print_json(alias);
    } else {
        print!("{}", change_text(&headline(), alias));
    }
}

/// A one-line summary of a change followed by the alias's split.
fn change_text(headline: &str, alias: &Alias) -> String {
    format!("{headline}\n\n{}", split_text(alias))
}

/// The alias's split table, or `-` if its routing is empty.
fn split_text(alias: &Alias) -> String {
    if alias.routing_config.weights.is_empty() {
        return "-\n".into();
    }
    split_table(&alias.routing_config)
}

/// Aliases asked for per page: a function may have this many, so one page usually does.
const PAGE: usize = nimbus_core::limits::MAX_ALIASES_PER_FUNCTION;

/// Every alias of a function (what `alias list --output json` prints).
#[derive(Debug, Serialize)]
struct AliasList {
    aliases: Vec<Alias>,
    total: usize,
}

/// Every alias of `function`, page after page.
async fn all_aliases(client: &Client, function: &str) -> Result<AliasList, CliError> {
    let mut aliases: Vec<Alias> = Vec::new();
    loop {
        let page = client
            .list_aliases(function, PAGE as u32, aliases.len() as u32)
            .await?;
        let total = page.page.total as usize;
        let done = page.aliases.is_empty();
        aliases.extend(page.aliases);
        // An alias deleted meanwhile shortens the total: stop at what is known, never loop.
        if done || aliases.len() >= total {
            let total = aliases.len();
            return Ok(AliasList { aliases, total });
        }
    }
}

/// `v2 90% · v3 10%`, or `-` for none.
fn routing_text(routing: Option<&RoutingConfig>) -> String {
    routing.map_or_else(|| "-".into(), compact)
}

/// The aliases as a table.
fn list_table(aliases: &[Alias]) -> String {
    let mut table = Table::new(&["name", "routing", "revision", "updated", "description"]);
    for a in aliases {
        table.row([
            dash(&a.name),
            routing_text(Some(&a.routing_config)),
            a.revision.to_string(),
            dash(&a.updated_at),
            dash(&a.description),
        ]);
    }
    if table.is_empty() {
        "no aliases\n".into()
    } else {
        table.text()
    }
}

/// The details view of one alias, its split below.
fn alias_details(a: &Alias) -> String {
    let fields = details(&[
        ("name", dash(&a.name)),
        ("function", dash(&a.function_id)),
        ("description", dash(&a.description)),
        ("revision", a.revision.to_string()),
        ("created", dash(&a.created_at)),
        ("updated", dash(&a.updated_at)),
    ]);
    format!("{fields}\n{}", split_text(a))
}

/// The history page as a table and how many entries it has.
fn history_table(page: &HistoryPage) -> (String, usize) {
    let mut table = Table::new(&["rev", "when", "by", "action", "routing", "previous"]);
    for e in &page.history {
        let action = match (e.action.as_str(), e.restored_revision) {
            ("rollback", Some(r)) => format!("rollback to r{r}"),
            _ => dash(&e.action),
        };
        table.row([
            e.revision.to_string(),
            dash(&e.changed_at),
            dash(&e.changed_by),
            action,
            routing_text(e.routing_config.as_ref()),
            routing_text(e.previous_routing_config.as_ref()),
        ]);
    }
    if table.is_empty() {
        ("no history\n".into(), 0)
    } else {
        (table.text(), page.history.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn alias() -> Alias {
        serde_json::from_value(json!({
            "function_id": "fn_1", "name": "prod", "description": "",
            "routing_config": {"weights": [{"version": 2, "weight": 90}, {"version": 3, "weight": 10}]},
            "revision": 4, "created_at": "t0", "updated_at": "t1"
        }))
        .unwrap()
    }

    #[test]
    fn list_shows_routing_compactly() {
        assert_eq!(
            list_table(&[alias()]),
            "NAME  ROUTING          REVISION  UPDATED  DESCRIPTION\n\
             prod  v2 90% · v3 10%  4         t1       -\n"
        );
        assert_eq!(list_table(&[]), "no aliases\n");
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
        let page: HistoryPage = serde_json::from_value(json!({"history": [
            {"revision": 2, "action": "rollback", "restored_revision": 1,
             "routing_config": {"weights": [{"version": 1, "weight": 100}]},
             "previous_routing_config": {"weights": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]},
             "changed_by": "admin", "changed_at": "t2", "description": ""},
            {"revision": 1, "action": "create", "restored_revision": null,
             "routing_config": {"weights": [{"version": 1, "weight": 100}]},
             "previous_routing_config": null,
             "changed_by": "admin", "changed_at": "t1", "description": ""}
        ], "total": 2, "limit": 20, "offset": 0}))
        .unwrap();
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
        assert_eq!(split_text(&Alias::default()), "-\n");
    }
}
