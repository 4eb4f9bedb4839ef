//! Rendering a report: one [`Doc`] of text and tables, printed for people or as the
//! Markdown section for docs/BENCHMARKS.md.

use crate::table::{Doc, Table};

use super::fmt::{fmt_count, fmt_delta_us, fmt_us, fmt_us_tenths};
use super::isolation::IsolationPhase;
use super::load::LatencyPhase;
use super::memory::ProcessMemory;
use super::node::NodePhase;
use super::phase::Phase;
use super::report::{Machine, Report};
use super::routing::RoutingPhase;
use super::snapshots::{Burst, SnapshotDisk, SnapshotPhase};
use super::starts::Starts;
use super::state::{StateBackendRun, StatePhase};
use super::stats::Latency;
use super::targets::{
    TARGET_STATE_GET_EMBEDDED_US, TARGET_STATE_GET_REDIS_US, TARGET_WARM_NOISE_FLOOR_US,
    TARGET_WARM_NOISE_SHARE,
};
use super::BenchArgs;

/// The routing phase's targets: what was invoked, its latency, and its p50 over the pinned
/// version's.
fn routing_targets(p: &RoutingPhase) -> [(String, &LatencyPhase, Option<f64>); 3] {
    [
        (
            format!("version {} (no alias)", p.stable_version),
            &p.pinned,
            None,
        ),
        (
            format!("alias latest (v{} only)", p.canary_version),
            &p.latest,
            Some(p.latest_overhead_us),
        ),
        (
            format!(
                "alias {} (v{} {}% / v{} {}%)",
                p.alias,
                p.stable_version,
                100 - p.canary_weight,
                p.canary_version,
                p.canary_weight
            ),
            &p.weighted,
            Some(p.weighted_overhead_us),
        ),
    ]
}

/// One-client latency phases side by side, each with its p50 difference to the first, and
/// their first errors.
fn latency_table(
    out: &mut Doc,
    what: &str,
    difference: &str,
    rows: &[(String, &LatencyPhase, Option<f64>)],
) {
    let mut table = Table::new(&[
        what, "requests", "p50", "p90", "p99", "errors", "not warm", difference,
    ]);
    for (name, phase, overhead) in rows {
        let l = &phase.latency;
        table.row([
            name.clone(),
            l.samples.to_string(),
            fmt_us(l.p50_us),
            fmt_us(l.p90_us),
            fmt_us(l.p99_us),
            phase.errors.to_string(),
            phase.non_warm.to_string(),
            overhead.map(fmt_delta_us).unwrap_or_default(),
        ]);
    }
    out.table(table);
    for (name, phase, _) in rows {
        if let Some(e) = &phase.first_error {
            out.text(format!("  first error ({name}): {e}\n"));
        }
    }
}

/// The isolation phase's warm rows: isolated (with its p50 over unisolated), unisolated.
fn warm_isolation_rows(i: &IsolationPhase) -> [(String, &LatencyPhase, Option<f64>); 2] {
    [
        ("unisolated".to_owned(), &i.warm_unisolated, None),
        (
            "isolated".to_owned(),
            &i.warm_isolated,
            Some(i.warm_difference_us),
        ),
    ]
}

/// The isolation phase's cold rows.
fn cold_isolation_rows(i: &IsolationPhase) -> [(&'static str, &Starts); 2] {
    [
        ("unisolated", &i.cold_unisolated),
        ("isolated", &i.cold_isolated),
    ]
}

/// What "within noise" means, with the bound of this run.
fn noise_rule(i: &IsolationPhase) -> String {
    format!(
        "within noise means |isolated p50 − unisolated p50| ≤ max({}, {:.0}% of the unisolated p50), here {}",
        fmt_us(TARGET_WARM_NOISE_FLOOR_US),
        TARGET_WARM_NOISE_SHARE * 100.0,
        fmt_us(i.warm_noise_us)
    )
}

/// The isolation phase for people.
fn human_isolation(out: &mut Doc, i: &IsolationPhase) {
    out.text(format!(
        "Isolation: two fresh servers, isolated ({}) and --insecure-no-isolation ({}), function {}\n",
        i.isolated_server, i.unisolated_server, i.function
    ));
    out.text(format!(
        "Cold starts, {} rounds (a new version on each server per round, interleaved):\n",
        i.cold_rounds
    ));
    let mut table = Table::new(&[
        "server",
        "starts",
        "p50 (server)",
        "p90 (server)",
        "p50 (round trip)",
        "p90 (round trip)",
        "errors",
        "not cold",
    ]);
    let cold = cold_isolation_rows(i);
    for (name, c) in &cold {
        table.row([
            name.to_string(),
            c.server.samples.to_string(),
            fmt_us(c.server.p50_us),
            fmt_us(c.server.p90_us),
            fmt_us(c.round_trip.p50_us),
            fmt_us(c.round_trip.p90_us),
            c.errors.to_string(),
            c.unexpected.to_string(),
        ]);
    }
    out.table(table);
    for (name, c) in &cold {
        if let Some(e) = &c.first_error {
            out.text(format!("  first error ({name}): {e}\n"));
        }
    }
    out.text(format!(
        "  isolation overhead (p50, isolated − unisolated): {} server-reported, {} round trip\n",
        fmt_delta_us(i.cold_overhead_us),
        fmt_delta_us(i.cold_round_trip_overhead_us)
    ));
    out.text(format!(
        "Warm latency, 1 client, {} interleaved rounds (one connection per server):\n",
        i.warm_rounds
    ));
    latency_table(
        out,
        "server",
        "p50 over unisolated",
        &warm_isolation_rows(i),
    );
    let (iso, uni) = (&i.warm_isolated.latency, &i.warm_unisolated.latency);
    out.text(format!(
        "  isolated − unisolated: p50 {}, p90 {}, p99 {}; {}\n\n",
        fmt_delta_us(iso.p50_us - uni.p50_us),
        fmt_delta_us(iso.p90_us - uni.p90_us),
        fmt_delta_us(iso.p99_us - uni.p99_us),
        noise_rule(i)
    ));
}

/// The Node.js phase's warm rows: Python, then Node.js with its p50 over Python's.
fn node_warm_rows(p: &NodePhase) -> [(String, &LatencyPhase, Option<f64>); 2] {
    [
        ("Python 3.11 no-op".to_owned(), &p.python, None),
        (
            "Node.js 20 no-op".to_owned(),
            &p.node,
            Some(p.node.latency.p50_us - p.python.latency.p50_us),
        ),
    ]
}

/// The Node.js phase's start rows.
fn node_start_rows(p: &NodePhase) -> [(&'static str, &Starts); 2] {
    [
        ("template (a spare)", &p.template_starts),
        ("cold (--no-snapshots)", &p.cold_starts),
    ]
}

/// The Node.js phase for people.
fn human_node(out: &mut Doc, p: &NodePhase) {
    out.text(format!(
        "Node.js: warm latency beside Python on one server ({}), 1 client, {} interleaved rounds:\n",
        p.warm_server, p.warm_rounds
    ));
    latency_table(out, "function", "p50 over Python", &node_warm_rows(p));
    out.text(format!("  Node.js p50 ÷ Python p50: {:.2}×\n", p.ratio));
    out.text(format!(
        "Node.js starts of {}, {} rounds (max_invocations = 1; spares ready {:.2} s after the \
         function was created; from spares {}, cold {}; interleaved):\n",
        p.function, p.start_rounds, p.spares_ready_s, p.template_server, p.cold_server
    ));
    starts_table(out, &node_start_rows(p));
    out.text(format!(
        "  cold p50 ÷ spare p50 (server-reported): {:.1}×\n\n",
        p.speedup
    ));
}

/// The snapshots phase's start rows.
fn snapshot_start_rows(p: &SnapshotPhase) -> [(&'static str, &Starts); 2] {
    [
        ("template", &p.template_starts),
        ("cold (--no-snapshots)", &p.cold_starts),
    ]
}

/// `100 invocations at once: 100 template, 0 errors`.
fn burst_text(b: &Burst) -> String {
    let types: Vec<String> = b
        .start_types
        .iter()
        .map(|(start_type, n)| format!("{n} {start_type}"))
        .collect();
    format!(
        "{} invocations at once: {}{} errors",
        b.invocations,
        types.iter().map(|t| format!("{t}, ")).collect::<String>(),
        b.errors
    )
}

/// What the heavy function's worker said about the size of its data structure.
fn structure_text(p: &SnapshotPhase) -> String {
    match p.structure_mib {
        Some(mib) => format!("its worker grew {mib:.1} MiB building it"),
        None => "its size was not reported".to_owned(),
    }
}

/// The snapshots phase for people.
fn human_snapshots(out: &mut Doc, p: &SnapshotPhase) {
    out.text(format!(
        "Snapshots: {} ({} MB; its init imports a heavy set of standard-library modules and \
         builds a data structure, {}), template ready and resident {:.2} s after the function \
         was created\n",
        p.function,
        p.memory_mb,
        structure_text(p),
        p.template_ready_s
    ));
    out.text(format!(
        "Starts, {} rounds (max_invocations = 1: a new instance per invocation; template {}, cold {}; interleaved):\n",
        p.rounds, p.template_server, p.cold_server
    ));
    starts_table(out, &snapshot_start_rows(p));
    out.text(format!(
        "  cold p50 ÷ template p50 (server-reported): {:.1}×\n",
        p.speedup
    ));
    match &p.disk {
        Phase::Measured(d) => {
            out.text(format!(
                "Starts from disk, {} rounds of {} ({}: each start restores the function's \
                 template from its checkpoint and evicts the other's; {}):\n",
                d.rounds,
                d.functions.join(" then "),
                DISK_TIER_CONFIG,
                d.server
            ));
            starts_table(out, &[("snapshot (disk tier)", &d.starts)]);
            out.text(format!(
                "  checkpoint of one template: {}\n",
                checkpoint_text(d)
            ));
        }
        Phase::Skipped(note) => out.text(format!("Starts from disk: {}\n", note)),
    }
    let m = &p.memory;
    out.text(format!(
        "Idle memory, {} ({} MB): {} ({}); baseline {} ({}):\n",
        m.function,
        m.memory_mb,
        burst_text(&m.burst),
        m.server,
        burst_text(&m.cold_burst),
        m.cold_server
    ));
    let mut table = Table::new(&[
        "processes",
        "count",
        "avg PSS",
        "max PSS",
        "avg RSS",
        "max RSS",
    ]);
    let mib = |v: f64| format!("{v:.2} MiB");
    for (name, memory) in snapshot_memory_rows(p) {
        match memory {
            Some(pm) => table.row([
                name.to_owned(),
                pm.processes.to_string(),
                mib(pm.avg_pss_mib),
                mib(pm.max_pss_mib),
                mib(pm.avg_rss_mib),
                mib(pm.max_rss_mib),
            ]),
            None => table.row([
                name.to_owned(),
                "0".to_owned(),
                "–".to_owned(),
                "–".to_owned(),
                "–".to_owned(),
                "–".to_owned(),
            ]),
        }
    }
    out.table(table);
    for b in [&m.burst, &m.cold_burst] {
        if let Some(e) = &b.first_error {
            out.text(format!("  first error: {e}\n"));
        }
    }
    if let Some(total) = m.cold_instance_pss_mib {
        out.text(format!(
            "  a whole cold instance (worker, sandbox init and PID 1): avg PSS {total:.2} MiB\n"
        ));
    }
    out.text("\n");
}

/// The disk tier's server configuration, as text.
const DISK_TIER_CONFIG: &str = "max_invocations = 1, [snapshots] memory_budget_mb = 1";

/// `67.5 MiB in 36 files, on disk 0.31 s after its function was created`: the checkpoint of
/// one template.
fn checkpoint_text(d: &SnapshotDisk) -> String {
    format!(
        "{:.1} MiB in {} files, on disk {:.2} s after its function was created",
        d.checkpoint_bytes as f64 / (1024.0 * 1024.0),
        d.checkpoint_files,
        d.checkpoint_ready_s
    )
}

/// Starts side by side, with their first errors.
fn starts_table(out: &mut Doc, rows: &[(&str, &Starts)]) {
    let mut table = Table::new(&[
        "start",
        "starts",
        "p50 (server)",
        "p95 (server)",
        "p99 (server)",
        "p50 (round trip)",
        "p95 (round trip)",
        "p99 (round trip)",
        "errors",
        "unexpected",
    ]);
    for (name, c) in rows {
        table.row([
            name.to_string(),
            c.server.samples.to_string(),
            fmt_us(c.server.p50_us),
            fmt_us(c.server.p95_us),
            fmt_us(c.server.p99_us),
            fmt_us(c.round_trip.p50_us),
            fmt_us(c.round_trip.p95_us),
            fmt_us(c.round_trip.p99_us),
            c.errors.to_string(),
            c.unexpected.to_string(),
        ]);
    }
    out.table(table);
    for (name, c) in rows {
        if let Some(e) = &c.first_error {
            out.text(format!("  first error ({name}): {e}\n"));
        }
    }
}

/// The snapshots phase's memory rows.
fn snapshot_memory_rows(p: &SnapshotPhase) -> [(&'static str, Option<&ProcessMemory>); 3] {
    let m = &p.memory;
    [
        ("instances forked from the template", m.instances.as_ref()),
        ("the template's worker", m.template.as_ref()),
        (
            "cold instances' workers (--no-snapshots)",
            m.cold_workers.as_ref(),
        ),
    ]
}

/// The state phase's backends that ran: name, its target, and the run.
fn state_backends(p: &StatePhase) -> Vec<(&'static str, f64, &StateBackendRun)> {
    std::iter::once(("embedded", TARGET_STATE_GET_EMBEDDED_US, &p.embedded))
        .chain(
            p.redis
                .measured()
                .map(|r| ("Redis", TARGET_STATE_GET_REDIS_US, r)),
        )
        .collect()
}

/// A backend's three series: what was called, and its latency.
fn state_calls(b: &StateBackendRun) -> [(&'static str, &Latency); 3] {
    [
        ("state.get (session)", &b.get),
        (
            "state.invocation().get (protocol only, baseline)",
            &b.baseline_get,
        ),
        ("state.set (session)", &b.set),
    ]
}

/// What one round invoked on each server.
fn state_round_text(p: &StatePhase) -> String {
    format!(
        "{} rounds, each invoking {} gets, {} invocation-scope gets and {} sets on each server, \
         interleaved",
        p.rounds, p.gets_per_invocation, p.gets_per_invocation, p.sets_per_invocation
    )
}

/// The state phase for people.
fn human_state(out: &mut Doc, p: &StatePhase) {
    out.text(format!(
        "State API from Python ({}, each call timed with time.perf_counter_ns; {}):\n",
        p.function,
        state_round_text(p)
    ));
    let mut table = Table::new(&[
        "backend", "call", "calls", "p50", "p90", "p99", "mean", "max",
    ]);
    let backends = state_backends(p);
    for (name, _, b) in &backends {
        for (call, l) in state_calls(b) {
            table.row([
                name.to_string(),
                call.to_owned(),
                l.samples.to_string(),
                fmt_us_tenths(l.p50_us),
                fmt_us_tenths(l.p90_us),
                fmt_us_tenths(l.p99_us),
                fmt_us_tenths(l.mean_us),
                fmt_us_tenths(l.max_us),
            ]);
        }
    }
    out.table(table);
    for (name, _, b) in &backends {
        out.text(format!(
            "  {name} ({}, {}): the backend adds {} to the get p50 (get − baseline); {} failed invocations\n",
            b.state_url,
            b.server,
            fmt_delta_us(b.backend_get_us),
            b.errors
        ));
        if let Some(e) = &b.first_error {
            out.text(format!("  first error ({name}): {e}\n"));
        }
    }
    if let Some(note) = p.redis.skipped() {
        out.text(format!("  Redis: {note}\n"));
    }
    out.text("\n");
}

fn machine_line(m: &Machine) -> String {
    format!(
        "{} CPUs ({}), {}, {}, nimbus {} ({} build)",
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.python.as_deref().unwrap_or("Python unknown"),
        m.nimbus_version,
        m.build
    )
}

/// The report after its heading: the same text and tables for people and, as Markdown,
/// for docs/BENCHMARKS.md.
fn report_doc(r: &Report) -> Doc {
    let mut doc = Doc::new();
    let out = &mut doc;
    out.text(format!(
        "Server:  {} ({})\n\n",
        r.server,
        if r.spawned_server {
            "started by bench"
        } else {
            "external"
        }
    ));
    let w = &r.warm_latency;
    out.text(format!(
        "Warm latency, 1 client, {} requests: p50 {}  p90 {}  p99 {}  mean {}  ({} errors, {} not warm)\n\n",
        w.latency.samples,
        fmt_us(w.latency.p50_us),
        fmt_us(w.latency.p90_us),
        fmt_us(w.latency.p99_us),
        fmt_us(w.latency.mean_us),
        w.errors,
        w.non_warm
    ));
    out.text(format!(
        "Routing, 1 client, {} interleaved rounds on one connection:\n",
        r.routing.rounds
    ));
    latency_table(
        out,
        "invoked",
        "p50 over version",
        &routing_targets(&r.routing),
    );
    out.text("\n");
    let mut table = Table::new(&[
        "clients",
        "seconds",
        "invocations",
        "inv/s",
        "p50",
        "p99",
        "errors",
        "not warm",
    ]);
    for t in &r.throughput {
        table.row([
            t.clients.to_string(),
            format!("{:.1}", t.duration_s),
            t.latency.samples.to_string(),
            fmt_count(t.invocations_per_sec),
            fmt_us(t.latency.p50_us),
            fmt_us(t.latency.p99_us),
            t.errors.to_string(),
            t.non_warm.to_string(),
        ]);
    }
    out.text("Throughput:\n");
    out.table(table);
    for t in r.throughput.iter().filter_map(|t| t.first_error.as_ref()) {
        out.text(format!("  first error: {t}\n"));
    }
    if let Some(e) = &w.first_error {
        out.text(format!("  first error (latency phase): {e}\n"));
    }
    out.text("\n");
    match &r.baseline {
        Some(b) => out.text(format!(
            "Spawn-per-invocation baseline ({}, {} runs): p50 {}  p99 {}  → warm is {:.0}× faster\n",
            b.python,
            b.runs,
            fmt_us(b.latency.p50_us),
            fmt_us(b.latency.p99_us),
            b.ratio_to_warm_p50
        )),
        None => out.text("Spawn-per-invocation baseline: skipped\n"),
    }
    match &r.idle_memory {
        Some(m) => out.text(format!(
            "Idle workers ({} processes, {}): max RSS {:.1} MiB, avg RSS {:.1} MiB{}\n\n",
            m.processes,
            m.basis,
            m.max_rss_mib,
            m.avg_rss_mib,
            m.avg_pss_mib
                .map(|p| format!(", avg PSS {p:.1} MiB"))
                .unwrap_or_default()
        )),
        None => out.text("Idle workers: none found\n\n"),
    }
    match &r.isolation {
        Phase::Measured(i) => human_isolation(out, i),
        Phase::Skipped(note) => out.text(format!("Isolation: {}\n\n", note)),
    }
    match &r.snapshots {
        Phase::Measured(p) => human_snapshots(out, p),
        Phase::Skipped(note) => out.text(format!("Snapshots: {}\n\n", note)),
    }
    match &r.state {
        Phase::Measured(p) => human_state(out, p),
        Phase::Skipped(note) => out.text(format!("State API: {}\n\n", note)),
    }
    match &r.node {
        Phase::Measured(p) => human_node(out, p),
        Phase::Skipped(note) => out.text(format!("Node.js: {}\n\n", note)),
    }
    out.text("Targets:\n");
    let mut table = Table::new(&["target", "promise", "measured", "result"]);
    for t in &r.targets {
        let result = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        table.row([
            t.name.clone(),
            t.target.clone(),
            t.measured.clone(),
            result.to_owned(),
        ]);
    }
    out.table(table);
    doc
}

/// The report for people.
pub(super) fn human_report(r: &Report) -> String {
    format!(
        "Nimbus benchmark, {}\nMachine: {}\n{}",
        r.machine.date,
        machine_line(&r.machine),
        report_doc(r).to_text()
    )
}

/// The report as a Markdown section for docs/BENCHMARKS.md: a heading, the machine and the
/// command, then what [`human_report`] prints, its tables in Markdown.
pub(super) fn markdown_report(r: &Report, args: &BenchArgs) -> String {
    let m = &r.machine;
    let concurrency: Vec<String> = args.concurrency.iter().map(ToString::to_string).collect();
    format!(
        "## {} — {} CPUs, {}\n\nMachine: `nproc` {}, {}, {}, {}; nimbus {} ({} build), process \
         driver.\n\nCommand: `nimbus-bench --requests {} --duration {} --concurrency {} \
         --baseline-runs {} --cold-starts {} --snapshot-starts {} --state-gets {} \
         --node-starts {}`\n\n{}",
        m.date,
        m.cpus,
        m.cpu_model,
        m.cpus,
        m.cpu_model,
        m.kernel,
        m.python.as_deref().unwrap_or("Python unknown"),
        m.nimbus_version,
        m.build,
        args.requests,
        args.duration,
        concurrency.join(","),
        args.baseline_runs,
        args.cold_starts,
        args.snapshot_starts,
        args.state_gets,
        args.node_starts,
        report_doc(r).to_markdown()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_summarized() {
        let mut burst = Burst {
            invocations: 100,
            errors: 1,
            ..Burst::default()
        };
        burst.start_types.insert("template".into(), 97);
        burst.start_types.insert("cold".into(), 2);
        assert_eq!(
            burst_text(&burst),
            "100 invocations at once: 2 cold, 97 template, 1 errors"
        );
    }
}
