//! `nimbus invoke` (synchronous or `--async`) and `nimbus invocations` (a function's recent
//! invocation records, or one record in full).

use std::io::Read;

use clap::Args;
use nimbus_client::{Failure, Invocation, InvokeResult, Target};

use super::table::{details, Table};
use super::{dash, opt, print_json, CliError, Connection};

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
    let client = args.conn.client()?;
    let target = Target {
        version: args.version,
        alias: args.alias.clone(),
        session_key: args.session.clone(),
    };
    let json = args.conn.json();
    if args.asynchronous {
        let queued = client.invoke_async(&args.function, &target, event).await?;
        if json {
            print_json(&queued);
        } else {
            let id = dash(&queued.request_id);
            println!("{id}");
            eprintln!("queued; see the result with: nimbus invocations {id}");
        }
        return Ok(());
    }
    // Refused before running (not found, bad request, throttled…) is an error of the call;
    // an invocation that ran and failed is an answer with an `error`.
    let result = client.invoke(&args.function, &target, event).await?;
    if json {
        print_json(&result);
    } else if let Some(error) = &result.error {
        eprint!("{}", failure_text(error));
        eprintln!("{}", summary(&result));
    } else {
        print_json(&result.body);
        eprintln!("{}", summary(&result));
    }
    if result.error.is_some() {
        Err(CliError::Reported)
    } else {
        Ok(())
    }
}

/// `version 2 · warm start · 0.412 ms · inv_…`.
fn summary(r: &InvokeResult) -> String {
    let mut parts = vec![
        format!("version {}", r.version),
        format!("{} start", dash(&r.start_type)),
        format!("{:.3} ms", r.duration_ms),
    ];
    if let Some(alias) = &r.alias_used {
        parts.insert(1, format!("alias {alias}"));
    }
    if let Some(session) = &r.session_key {
        parts.push(format!("session {session}"));
    }
    parts.push(dash(&r.request_id));
    parts.join(" · ")
}

/// `error: <type>: <message> (<code>)` and the traceback, each line ending in a newline.
fn failure_text(error: &Failure) -> String {
    let code = dash(&error.code);
    let message = &error.message;
    let mut out = match error.error_type.as_deref() {
        Some(t) if !t.is_empty() && !message.starts_with(t) => {
            format!("error: {t}: {message} ({code})\n")
        }
        _ => format!("error: {message} ({code})\n"),
    };
    if let Some(tb) = error
        .traceback
        .as_deref()
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
    let client = args.conn.client()?;
    let json = args.conn.json();
    if args.target.starts_with("inv_") {
        let record = client.get_invocation(&args.target).await?;
        if json {
            print_json(&record);
        } else {
            print!("{}", record_details(&record));
        }
        return Ok(());
    }
    let page = client
        .list_invocations(&args.target, args.limit, args.status.as_deref())
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
    for i in &page.invocations {
        table.row([
            dash(&i.request_id),
            i.version.to_string(),
            dash(&i.status),
            opt(&i.start_type),
            i.duration_ms
                .map(|d| format!("{d:.3}"))
                .unwrap_or_else(|| "-".into()),
            dash(&i.started_at),
        ]);
    }
    if table.is_empty() {
        println!("no invocations");
    } else {
        print!("{}", table.text());
    }
    Ok(())
}

/// One invocation record in full: fields, input, output, error and logs.
fn record_details(r: &Invocation) -> String {
    let mut out = details(&[
        ("request_id", dash(&r.request_id)),
        (
            "function",
            format!("{} ({})", dash(&r.function_name), dash(&r.function_id)),
        ),
        ("version", r.version.to_string()),
        ("alias", opt(&r.alias_used)),
        ("session", opt(&r.session_key)),
        ("trigger", dash(&r.trigger)),
        ("status", dash(&r.status)),
        ("start type", opt(&r.start_type)),
        ("instance", opt(&r.instance_id)),
        ("started", dash(&r.started_at)),
        ("completed", opt(&r.completed_at)),
        (
            "duration",
            r.duration_ms
                .map(|d| format!("{d:.3} ms"))
                .unwrap_or_else(|| "-".into()),
        ),
        (
            "memory",
            r.memory_used_mb
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
    for (key, value) in [("input", &r.input), ("output", &r.output)] {
        if !value.is_null() {
            block(
                &mut out,
                key,
                &serde_json::to_string_pretty(value).unwrap_or_default(),
            );
        }
    }
    if let Some(error) = &r.error {
        let text = failure_text(error);
        block(
            &mut out,
            "error",
            text.strip_prefix("error: ").unwrap_or(&text),
        );
    }
    if !r.logs.trim().is_empty() {
        block(&mut out, "logs", &r.logs);
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
        let failure = |v| serde_json::from_value::<Failure>(v).unwrap();
        let r = failure(
            json!({"code": "function_error", "message": "division by zero",
            "type": "ZeroDivisionError", "traceback": "Traceback:\n  line 1\n"}),
        );
        assert_eq!(
            failure_text(&r),
            "error: ZeroDivisionError: division by zero (function_error)\nTraceback:\n  line 1\n"
        );
        let r = failure(json!({"code": "function_timeout", "message": "timed out after 1 s"}));
        assert_eq!(
            failure_text(&r),
            "error: timed out after 1 s (function_timeout)\n"
        );
    }

    #[test]
    fn summaries_name_version_start_and_request() {
        let r: InvokeResult = serde_json::from_value(json!({"version": 2, "start_type": "warm",
            "duration_ms": 0.4121, "request_id": "inv_1", "alias_used": "latest",
            "session_key": null}))
        .unwrap();
        assert_eq!(
            summary(&r),
            "version 2 · alias latest · warm start · 0.412 ms · inv_1"
        );
    }
}
