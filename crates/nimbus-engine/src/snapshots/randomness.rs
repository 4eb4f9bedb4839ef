//! The check that instances started from a template would not share random state
//! (SPEC §6), run after its build and after its restore from disk.

use std::time::Instant;

use nimbus_runtime::protocol::ErrorPayload;
use nimbus_sandbox::Template;

use crate::instance::StartError;
use crate::launcher::{ms_since, Launcher};
use crate::metrics;

/// Checks, before `template` serves, that instances started from it would not share
/// random state (SPEC §6). The runtime reseeds every generator it knows in each new
/// instance; this does not take that list on trust: two probe instances forked from the
/// template draw from every generator object the template holds (the function's own
/// included) and from each OpenSSL, and one that gives both the same output refuses the
/// template (`stage`: after its build, or after its restore from disk). The probes get as
/// long as a start may take (`launcher`'s start timeout).
pub(super) async fn check(
    launcher: &Launcher,
    template: Box<dyn Template>,
    stage: Stage,
) -> Result<Box<dyn Template>, StartError> {
    let limit = launcher.start_timeout();
    let started = Instant::now();
    let probe = match tokio::time::timeout(limit, template.probe()).await {
        Err(_) => return Err(StartError::Timeout(limit)),
        Ok(Err(e)) => return Err(StartError::Crashed(e.message)),
        Ok(Ok(probe)) => probe,
    };
    tracing::debug!(
        stage = stage.as_str(),
        ms = ms_since(started),
        generators = probe.compared,
        "probed the template's instances for shared random state"
    );
    if probe.same.is_empty() {
        return Ok(template);
    }
    metrics::snapshot_shared_random(stage.as_str());
    Err(StartError::Init {
        error: ErrorPayload {
            error_type: "SharedRandomState".into(),
            message: shared_random_message(&probe.same, probe.same_count),
            traceback: String::new(),
        },
        logs: String::new(),
    })
}

/// When a template is checked for shared random state.
#[derive(Clone, Copy)]
pub(super) enum Stage {
    /// Built from the function's code.
    Build,
    /// Restored from its checkpoint.
    Restore,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::Build => "build",
            Stage::Restore => "restore",
        }
    }
}

/// Why a template whose probes agree is refused, naming (a few of) the `count`
/// generators, of which `same` names the first.
fn shared_random_message(same: &[String], count: usize) -> String {
    const SHOWN: usize = 5;
    let mut names: Vec<String> = same
        .iter()
        .take(SHOWN)
        .map(|name| nimbus_core::echo::cut(name, 120).into_owned())
        .collect();
    let count = count.max(same.len());
    if count > names.len() {
        names.push(format!("and {} more", count - names.len()));
    }
    format!(
        "instances started from this snapshot would share random state: {} gave the same \
         values in two of them; reseed it in an @nimbus.after_restore hook, or mark a \
         generator meant to repeat with nimbus.deterministic() (docs/SNAPSHOTS.md). \
         Instances start cold until a snapshot passes",
        names.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_a_few_generators_and_counts_the_rest() {
        let names: Vec<String> = (0..20).map(|i| format!("handler.RNG{i}")).collect();
        let message = shared_random_message(&names, 4000);
        assert!(message.contains("handler.RNG0, handler.RNG1"), "{message}");
        assert!(
            message.contains("handler.RNG4, and 3995 more gave"),
            "{message}"
        );
        assert!(!message.contains("RNG5"), "{message}");
        let one = shared_random_message(&["tempfile names".to_owned()], 1);
        assert!(one.contains(": tempfile names gave the same"), "{one}");
        let long = shared_random_message(&["x".repeat(1000)], 1);
        assert!(long.len() < 600, "{long}");
    }
}
