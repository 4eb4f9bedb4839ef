//! New-instance starts: single invocations that must each start a new instance of a
//! function version in a given way (`cold`, `template`, `snapshot`), and the summary of
//! their latency.

use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::load::{call, connect, LoadTarget, Sender};
use super::stats::Latency;

/// Starts of one server.
#[derive(Debug, Default, Serialize)]
pub struct Starts {
    /// The `start_type` every start had to report.
    pub expected: String,
    /// `duration_ms` the server reported for each expected start: getting a new instance
    /// plus running the handler once.
    pub server: Latency,
    /// The client's round trip of the same invocations.
    pub round_trip: Latency,
    /// Failed invocations.
    pub errors: u64,
    /// Successful invocations that did not start a new instance of the version the
    /// expected way (not counted in the latencies).
    pub unexpected: u64,
    /// The first failure or unexpected answer, if any.
    pub first_error: Option<String>,
}

/// Samples of one server's starts, ns.
pub(super) struct StartSamples {
    expected: &'static str,
    server_ns: Vec<u64>,
    round_trip_ns: Vec<u64>,
    errors: u64,
    unexpected: u64,
    first_error: Option<String>,
}

impl StartSamples {
    /// No samples yet of starts that must report `start_type` `expected`.
    pub(super) fn new(expected: &'static str) -> Self {
        StartSamples {
            expected,
            server_ns: Vec::new(),
            round_trip_ns: Vec::new(),
            errors: 0,
            unexpected: 0,
            first_error: None,
        }
    }

    /// Invokes `target` once on `sender`'s connection (replaced if it broke); the answer
    /// must be an expected start of `version`.
    pub(super) async fn invoke(
        &mut self,
        target: &LoadTarget,
        version: u32,
        sender: &mut Sender,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let reply = call(sender, target).await;
        let round_trip = start.elapsed();
        let body = match reply {
            Ok((200, body)) => body,
            Ok((status, body)) => {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                self.errors += 1;
                self.first_error
                    .get_or_insert(format!("HTTP {status}: {text}"));
                return Ok(());
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(format!("{e:#}"));
                *sender = connect(target).await?;
                return Ok(());
            }
        };
        let reply: Value = serde_json::from_slice(&body)?;
        let start_type = reply["start_type"].as_str().unwrap_or_default();
        match reply["duration_ms"].as_f64() {
            Some(ms) if start_type == self.expected && reply["version"] == version => {
                self.server_ns.push((ms * 1e6) as u64);
                self.round_trip_ns.push(round_trip.as_nanos() as u64);
            }
            _ => {
                self.unexpected += 1;
                self.first_error.get_or_insert(format!(
                    "expected a {} start of version {version}, the server answered {reply}",
                    self.expected
                ));
            }
        }
        Ok(())
    }

    pub(super) fn summary(mut self) -> Starts {
        Starts {
            expected: self.expected.to_owned(),
            server: Latency::from_ns(&mut self.server_ns),
            round_trip: Latency::from_ns(&mut self.round_trip_ns),
            errors: self.errors,
            unexpected: self.unexpected,
            first_error: self.first_error,
        }
    }
}
