//! The canary walkthrough of `docs/CANARY.md` runs as written, on SQLite and on
//! PostgreSQL: every `$ ` line of its `sh` blocks runs in order against a fresh server, with
//! the real `nimbus` on PATH and `NIMBUS_SERVER` pointing at it, and prints what the
//! document shows after it. Values that differ from run to run (ids, timestamps, durations)
//! are compared as placeholders; a command whose output depends on chance ends with
//! `# output varies` and is only required to succeed. A command may fail only where the
//! document shows it failing (its output starts with `error:`).
//!
//! `NIMBUS_UPDATE_DOCS=1 cargo test -p nimbus --test walkthrough sqlite` rewrites the
//! document's outputs from a real run.

use std::path::{Path, PathBuf};
use std::process::Command;

use nimbus_testkit::on_both_backends;
use nimbus_testkit::server::{Backend, Nimbus};

/// The binary under test.
const NIMBUS: Nimbus = Nimbus::at(env!("CARGO_BIN_EXE_nimbus"));

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CANARY.md");
const VARIES: &str = "# output varies";

on_both_backends!(canary_walkthrough_runs_as_written);

/// One `$ command` of the document and the output lines shown under it.
struct Step {
    command: String,
    /// Index of the command's line in the document.
    line: usize,
    expected: Vec<String>,
}

/// The steps of every ```sh block, in order.
fn steps(doc: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    for (i, line) in doc.lines().enumerate() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        match line.strip_prefix("$ ") {
            Some(command) => steps.push(Step {
                command: command.to_owned(),
                line: i,
                expected: Vec::new(),
            }),
            None => {
                if let Some(step) = steps.last_mut() {
                    step.expected.push(line.to_owned());
                }
            }
        }
    }
    steps
}

/// Runs `command` with `sh` in `dir`, stderr merged into stdout in program order.
fn run(command: &str, dir: &Path, server: &str) -> (bool, String) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_nimbus"));
    let path = format!(
        "{}:{}",
        bin.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 2>&1; {command}"))
        .current_dir(dir)
        .env("PATH", path)
        .env("NIMBUS_SERVER", server)
        .env_remove("NIMBUS_API_KEY")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), text)
}

/// Replaces what differs between runs with placeholders.
fn normalize(text: &str) -> String {
    let patterns = [
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", "<time>"),
        (r"\b(fn|inv|i)_[0-9a-z]{26}\b", "<$1_id>"),
        (r"\d+\.\d+ ms", "<ms>"),
        (r#""duration_ms":\s*[0-9.]+"#, r#""duration_ms": <ms>"#),
    ];
    let mut text = text.trim_end().to_owned();
    for (pattern, replacement) in patterns {
        text = regex::Regex::new(pattern)
            .unwrap()
            .replace_all(&text, replacement)
            .into_owned();
    }
    text
}

async fn canary_walkthrough_runs_as_written(backend: Backend) {
    let doc = std::fs::read_to_string(DOC).unwrap();
    let steps = steps(&doc);
    assert!(steps.len() >= 10, "docs/CANARY.md has too few steps");
    let server = NIMBUS.start(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let update =
        matches!(backend, Backend::Sqlite) && std::env::var_os("NIMBUS_UPDATE_DOCS").is_some();
    let mut lines: Vec<String> = doc.lines().map(str::to_owned).collect();
    let mut replaced: Vec<(usize, usize, Vec<String>)> = Vec::new();
    for step in &steps {
        let (ok, output) = run(&step.command, dir.path(), &server.base);
        let shown_failing = step
            .expected
            .first()
            .is_some_and(|l| l.starts_with("error:"));
        assert!(
            ok || shown_failing || update,
            "`{}` failed:\n{output}",
            step.command
        );
        if update {
            replaced.push((
                step.line + 1,
                step.expected.len(),
                output.trim_end().lines().map(str::to_owned).collect(),
            ));
        } else if !step.command.ends_with(VARIES) {
            assert_eq!(
                normalize(&output),
                normalize(&step.expected.join("\n")),
                "output of `{}` differs from docs/CANARY.md",
                step.command
            );
        }
    }
    if update {
        for (at, len, output) in replaced.into_iter().rev() {
            lines.splice(at..at + len, output);
        }
        std::fs::write(DOC, lines.join("\n") + "\n").unwrap();
    }
}
