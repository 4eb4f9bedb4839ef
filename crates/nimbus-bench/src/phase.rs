//! What a phase of the benchmark came to: measured, or skipped and why.

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

/// A phase's outcome.
#[derive(Debug, Clone)]
pub enum Phase<T> {
    /// It ran.
    Measured(T),
    /// It did not run; why (`skipped: …`).
    Skipped(String),
}

impl<T> Phase<T> {
    /// The measurement, if the phase ran.
    pub fn measured(&self) -> Option<&T> {
        match self {
            Phase::Measured(m) => Some(m),
            Phase::Skipped(_) => None,
        }
    }

    /// The measurement, if the phase ran, to go on measuring.
    pub fn measured_mut(&mut self) -> Option<&mut T> {
        match self {
            Phase::Measured(m) => Some(m),
            Phase::Skipped(_) => None,
        }
    }

    /// Why the phase did not run, if it did not.
    pub fn skipped(&self) -> Option<&str> {
        match self {
            Phase::Measured(_) => None,
            Phase::Skipped(why) => Some(why),
        }
    }
}

/// `phase` as the two keys of the JSON report: `name` (the measurement, or null) and
/// `skipped` (the reason, or null).
fn as_two_keys<S: Serializer, T: Serialize>(
    phase: &Phase<T>,
    name: &str,
    skipped: &str,
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(2))?;
    map.serialize_entry(name, &phase.measured())?;
    map.serialize_entry(skipped, &phase.skipped())?;
    map.end()
}

/// `serialize_with` functions for `#[serde(flatten)]` phase fields, one per key name.
macro_rules! phase_keys {
    ($($fn:ident: $name:literal),* $(,)?) => {$(
        #[doc = concat!("A [`Phase`] as the keys `", $name, "` and `", $name, "_skipped`.")]
        pub fn $fn<S: Serializer, T: Serialize>(phase: &Phase<T>, s: S) -> Result<S::Ok, S::Error> {
            as_two_keys(phase, $name, concat!($name, "_skipped"), s)
        }
    )*};
}

phase_keys!(
    isolation: "isolation",
    snapshots: "snapshots",
    state: "state",
    node: "node",
    disk: "disk",
    redis: "redis",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Report {
        #[serde(flatten, serialize_with = "disk")]
        disk: Phase<u32>,
        after: bool,
    }

    #[test]
    fn phases_keep_the_reports_two_keys() {
        let measured = Report {
            disk: Phase::Measured(7),
            after: true,
        };
        assert_eq!(
            serde_json::to_string(&measured).unwrap(),
            r#"{"disk":7,"disk_skipped":null,"after":true}"#
        );
        let skipped = Report {
            disk: Phase::Skipped("skipped: no CRIU".into()),
            after: true,
        };
        assert_eq!(
            serde_json::to_string(&skipped).unwrap(),
            r#"{"disk":null,"disk_skipped":"skipped: no CRIU","after":true}"#
        );
    }
}
