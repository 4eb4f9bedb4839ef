//! `nimbus invoke` (synchronous or `--async`) and `nimbus invocations` (a function's recent
//! invocation records, or one record in full).

use std::io::Read;

use clap::Args;
use reqwest::Method;
use serde_json::Value;

use super::http::{api_error, segment};
use super::table::{details, Table};
use super::{print_json, text, CliError, Client, Connection, Output};

/// Flags of `nimbus invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// Function name or id.
    pub function: String,
    /// Invoke through this alias [default: latest].
    #[arg(long, conflicts_with = "version")]
    pub alias: Option<String>,
    /// Invoke this version.
    #[arg(long)]
    pub version: Option<u32>,
    /// Session key (routes the session to one version and, with affinity, one instance).
    #[arg(long, value_name = "KEY")]
    pub session: Option<String>,
    /// The event as JSON, or `-` to read it from stdin [default: {}].
    #[arg(long, short = 'd', value_name = "JSON")]
    pub data: Option<String>,
    /// Queue the invocation and print its request id instead of waiting for the result.
    #[arg(long = "async")]
    pub asynchronous: bool,
    /// Server, API key and output format.
    #[command(flatten)]
    pub conn: Connection,
}

/// Flags of `nimbus invocations`.
#[derive(Debug, Args)]
pub struct InvocationsArgs {
    /// A function name or id (lists its invocations), or a request id `inv_…` (shows that one).
    pub target: String,
    /// Most records listed.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Only records with this status (pending, running, success, error, timeout).
    #[arg(long)]
    pub status: Option<String>,
    /// Server, API key and output format.
    #[command(flatten)]
    pub conn: Connection,
}

/// Reads and checks the event: `--data JSON`, `--data -` (stdin), or `{}`.
fn event_bytes(data: Option<&str>) -> Result<Vec<u8>, CliError> {
    let (bytes, source) = match data {
        None => return Ok(b"{}".to_vec()),
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::Usage(format!("reading the event from stdin: {e}")))?;
            (buf, "stdin")
        }
        Some(text) => (text.as_bytes().to_vec(), "--data"),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(b"{}".to_vec());
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| CliError::Usage(format!("the event from {source} is not valid JSON: {e}")))?;
    Ok(bytes)
}

/// Runs `nimbus invoke`.
pub async fn run_invoke(args: InvokeArgs) -> Result<(), CliError> {
    let event = event_bytes(args.data.as_deref())?;
    let client = Client::from_connection(&args.conn)?;
    let mut query = Vec::new();
    if let Some(v) = args.version {
        query.push(("version", v.to_string()));
    }
    if let Some(a) = &args.alias {
        query.push(("alias", a.clone()));
    }
    if let Some(s) = &args.session {
        query.push(("session_key", s.clone()));
    }
    let json = args.conn.output == Output::Json;
    let function = segment(&args.function);
    if args.asynchronous {
        let queued = client
            .send(
                Method::POST,
                &format!("/functions/{function}/async"),
                &query,
                Some(event),
            )
            .await?
            .into_result()?;
        if json {
            print_json(&queued);
        } else {
            let id = text(&queued["request_id"]);
            println!("{id}");
            eprintln!("queued; see the result with: nimbus invocations {id}");
        }
        return Ok(());
    }
    let reply = client
        .send(
            Method::POST,
            &format!("/functions/{function}/invoke"),
            &query,
            Some(event),
        )
        .await?;
    let ran = reply.body.get("request_id").is_some();
    if !reply.status.is_success() && !ran {
        // Refused before running (not found, bad request, throttled…).
        return Err(api_error(reply.status, &reply.body));
    }
    let failed = !reply.status.is_success();
    if json {
        print_json(&reply.body);
    } else if failed {
        eprint!("{}", failure_text(&reply.body));
        eprintln!("{}", summary(&reply.body));
    } else {
        print_json(&reply.body["body"]);
        eprintln!("{}", summary(&reply.body));
    }
    if failed {
        Err(CliError::Reported)
    } else {
        Ok(())
    }
}

/// `version 2 · warm start · 0.412 ms · inv_…`.
fn summary(r: &Value) -> String {
    let mut parts = vec![
        format!("version {}", text(&r["version"])),
        format!("{} start", text(&r["start_type"])),
        match r["duration_ms"].as_f64() {
            Some(ms) => format!("{ms:.3} ms"),
            None => "- ms".to_owned(),
        },
    ];
    if let Some(alias) = r["alias_used"].as_str() {
        parts.insert(1, format!("alias {alias}"));
    }
    if let Some(session) = r["session_key"].as_str() {
        parts.push(format!("session {session}"));
    }
    parts.push(text(&r["request_id"]));
    parts.join(" · ")
}

/// `error: <type>: <message> (<code>)` and the traceback, each line ending in a newline.
fn failure_text(r: &Value) -> String {
    let error = &r["error"];
    let code = text(&error["code"]);
    let message = error["message"].as_str().unwrap_or("the invocation failed");
    let mut out = match error["type"].as_str() {
        Some(t) if !t.is_empty() && !message.starts_with(t) => {
            format!("error: {t}: {message} ({code})\n")
        }
        _ => format!("error: {message} ({code})\n"),
    };
    if let Some(tb) = error["traceback"]
        .as_str()
        .map(str::trim_end)
        .filter(|t| !t.is_empty())
    {
        out.push_str(tb);
        out.push('\n');
    }
    out
}

/// Runs `nimbus invocations`.
pub async fn run_invocations(args: InvocationsArgs) -> Result<(), CliError> {
    let client = Client::from_connection(&args.conn)?;
    let json = args.conn.output == Output::Json;
    if args.target.starts_with("inv_") {
        let record = client
            .get(&format!("/invocations/{}", segment(&args.target)), &[])
            .await?;
        if json {
            print_json(&record);
        } else {
            print!("{}", record_details(&record));
        }
        return Ok(());
    }
    let mut query = vec![("limit", args.limit.to_string())];
    if let Some(s) = &args.status {
        query.push(("status", s.clone()));
    }
    let page = client
        .get(
            &format!("/functions/{}/invocations", segment(&args.target)),
            &query,
        )
        .await?;
    if json {
        print_json(&page);
        return Ok(());
    }
    let mut table = Table::new(&[
        "request_id",
        "version",
        "status",
        "start_type",
        "duration_ms",
        "started_at",
    ]);
    for i in page["invocations"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        table.row([
            text(&i["request_id"]),
            text(&i["version"]),
            text(&i["status"]),
            text(&i["start_type"]),
            i["duration_ms"]
                .as_f64()
                .map(|d| format!("{d:.3}"))
                .unwrap_or_else(|| "-".into()),
            text(&i["started_at"]),
        ]);
    }
    if table.is_empty() {
        println!("no invocations");
    } else {
        print!("{}", table.render());
    }
    Ok(())
}

/// One invocation record in full: fields, input, output, error and logs.
fn record_details(r: &Value) -> String {
    let mut out = details(&[
        ("request_id", text(&r["request_id"])),
        (
            "function",
            format!(
                "{} ({})",
                text(&r["function_name"]),
                text(&r["function_id"])
            ),
        ),
        ("version", text(&r["version"])),
        ("alias", text(&r["alias_used"])),
        ("session", text(&r["session_key"])),
        ("trigger", text(&r["trigger"])),
        ("status", text(&r["status"])),
        ("start type", text(&r["start_type"])),
        ("instance", text(&r["instance_id"])),
        ("started", text(&r["started_at"])),
        ("completed", text(&r["completed_at"])),
        (
            "duration",
            r["duration_ms"]
                .as_f64()
                .map(|d| format!("{d:.3} ms"))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "memory",
            r["memory_used_mb"]
                .as_u64()
                .map(|m| format!("{m} MB"))
                .unwrap_or_else(|| "-".into()),
        ),
    ]);
    let block = |out: &mut String, title: &str, body: &str| {
        out.push_str(&format!("\n{title}:\n"));
        for line in body.trim_end().lines() {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    };
    for key in ["input", "output"] {
        if !r[key].is_null() {
            block(
                &mut out,
                key,
                &serde_json::to_string_pretty(&r[key]).unwrap_or_default(),
            );
        }
    }
    if r["error"].is_object() {
        let text = failure_text(&serde_json::json!({ "error": r["error"] }));
        block(
            &mut out,
            "error",
            text.strip_prefix("error: ").unwrap_or(&text),
        );
    }
    if let Some(logs) = r["logs"].as_str().filter(|l| !l.trim().is_empty()) {
        block(&mut out, "logs", logs);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_are_validated() {
        assert_eq!(event_bytes(None).unwrap(), b"{}");
        assert_eq!(event_bytes(Some(" ")).unwrap(), b"{}");
        assert_eq!(event_bytes(Some(r#"{"a":1}"#)).unwrap(), br#"{"a":1}"#);
        let err = event_bytes(Some("{a")).unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn failures_show_type_message_and_traceback() {
        let r = json!({"error": {"code": "function_error", "message": "division by zero",
            "type": "ZeroDivisionError", "traceback": "Traceback:\n  line 1\n"}});
        assert_eq!(
            failure_text(&r),
            "error: ZeroDivisionError: division by zero (function_error)\nTraceback:\n  line 1\n"
        );
        let r = json!({"error": {"code": "function_timeout", "message": "timed out after 1 s"}});
        assert_eq!(
            failure_text(&r),
            "error: timed out after 1 s (function_timeout)\n"
        );
    }

    #[test]
    fn summaries_name_version_start_and_request() {
        let r = json!({"version": 2, "start_type": "warm", "duration_ms": 0.4121,
            "request_id": "inv_1", "alias_used": "latest", "session_key": null});
        assert_eq!(
            summary(&r),
            "version 2 · alias latest · warm start · 0.412 ms · inv_1"
        );
    }
}
