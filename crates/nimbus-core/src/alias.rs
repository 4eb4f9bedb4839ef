//! Aliases: named pointers to one or more versions with weights.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::echo::echo;
use crate::error::ValidationError;

/// The alias every function has, moved by each publish.
pub const LATEST_ALIAS: &str = "latest";

/// Most versions one alias may route to.
pub const MAX_ROUTES: usize = 10;

/// One entry of a routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedVersion {
    /// Version number.
    pub version: u32,
    /// Share of traffic in percent, 0–100.
    pub weight: u32,
}

/// `{"weights":[{"version":2,"weight":90},{"version":3,"weight":10}]}`.
///
/// Buckets 0–99 are laid out over the entries in the order of the table, which
/// [`RoutingConfig::normalized`] makes ascending by version: older versions hold the low
/// buckets, so shifting weight from an old version to a newer one moves sessions only in
/// that direction, whatever order the weights were written in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The versions and their shares; the shares sum to 100.
    pub weights: Vec<WeightedVersion>,
}

impl RoutingConfig {
    /// All traffic to one version.
    pub fn single(version: u32) -> Self {
        RoutingConfig {
            weights: vec![WeightedVersion {
                version,
                weight: 100,
            }],
        }
    }

    /// The same table with its entries in ascending version order (the stored form).
    pub fn normalized(mut self) -> Self {
        self.weights.sort_by_key(|w| w.version);
        self
    }

    /// The versions the table names, including those with weight 0.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.weights.iter().map(|w| w.version)
    }

    /// 1–10 entries, weights 0–100 summing to exactly 100, distinct versions ≥ 1.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let field = "routing_config.weights";
        if self.weights.is_empty() || self.weights.len() > MAX_ROUTES {
            return Err(ValidationError::new(
                field,
                format!(
                    "{} entries; between 1 and {MAX_ROUTES} required",
                    self.weights.len()
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, w) in self.weights.iter().enumerate() {
            if w.version == 0 {
                return Err(ValidationError::new(
                    format!("{field}[{i}].version"),
                    "versions start at 1",
                ));
            }
            if w.weight > 100 {
                return Err(ValidationError::new(
                    format!("{field}[{i}].weight"),
                    format!("{} is out of range 0..=100", w.weight),
                ));
            }
            if !seen.insert(w.version) {
                return Err(ValidationError::new(
                    field,
                    format!("version {} appears more than once", w.version),
                ));
            }
        }
        let sum: u32 = self.weights.iter().map(|w| w.weight).sum();
        if sum != 100 {
            return Err(ValidationError::new(
                field,
                format!("weights sum to {sum}; they must sum to exactly 100"),
            ));
        }
        Ok(())
    }

    /// The version owning `bucket` (0–99) when the weights are laid end to end in order.
    pub fn version_for_bucket(&self, bucket: u32) -> u32 {
        let mut upper = 0;
        for w in &self.weights {
            upper += w.weight;
            if bucket < upper {
                return w.version;
            }
        }
        // Only reachable for bucket >= 100; validated tables always sum to 100.
        self.weights.last().map(|w| w.version).unwrap_or(0)
    }
}

/// A named routing table of a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionAlias {
    /// Owning function.
    pub function_id: String,
    /// `[a-z][a-z0-9-_]{0,63}`.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Where its traffic goes.
    pub routing: RoutingConfig,
    /// Number of the alias's latest change (1 at creation); see [`AliasRevision`].
    pub revision: u32,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

string_enum!(
    /// What made an alias change.
    AliasAction {
        /// The alias was created.
        Create => "create",
        /// Its routing or description was set.
        Update => "update",
        /// Publishing a version moved it.
        Publish => "publish",
        /// It was rolled back to an earlier revision.
        Rollback => "rollback",
    }
);

/// One change of an alias, kept so any earlier routing can be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRevision {
    /// Owning function.
    pub function_id: String,
    /// The alias.
    pub alias: String,
    /// 1 for the creation, then one more per change.
    pub revision: u32,
    /// What made the change.
    pub action: AliasAction,
    /// Routing after the change.
    pub routing: RoutingConfig,
    /// Routing before the change (none for a creation).
    pub previous_routing: Option<RoutingConfig>,
    /// Description after the change.
    pub description: String,
    /// For a rollback, the revision whose routing was restored.
    pub restored_revision: Option<u32>,
    /// Who made the change (API key name).
    pub changed_by: String,
    /// When.
    pub changed_at: OffsetDateTime,
}

/// Alias names are `[a-z][a-z0-9-_]{0,63}`.
pub fn validate_alias_name(name: &str) -> Result<(), ValidationError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.len() <= 64;
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "name",
            format!("{} is not a valid alias name: 1-64 characters of a-z, 0-9, '-', '_', starting with a letter", echo(name)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(u32, u32)]) -> RoutingConfig {
        RoutingConfig {
            weights: pairs
                .iter()
                .map(|&(version, weight)| WeightedVersion { version, weight })
                .collect(),
        }
    }

    #[test]
    fn valid_tables_pass_and_buckets_follow_weights() {
        let t = table(&[(2, 90), (3, 10)]);
        t.validate().unwrap();
        assert_eq!(t.version_for_bucket(0), 2);
        assert_eq!(t.version_for_bucket(89), 2);
        assert_eq!(t.version_for_bucket(90), 3);
        assert_eq!(t.version_for_bucket(99), 3);
        let counts = (0..100).filter(|&b| t.version_for_bucket(b) == 3).count();
        assert_eq!(counts, 10);
        table(&[(1, 0), (2, 100)]).validate().unwrap();
    }

    #[test]
    fn normalized_tables_give_old_versions_the_low_buckets() {
        let t = table(&[(3, 10), (2, 90)]).normalized();
        assert_eq!(t, table(&[(2, 90), (3, 10)]));
        assert_eq!(t.versions().collect::<Vec<_>>(), vec![2, 3]);
        // Shifting weight to the newer version moves buckets only towards it.
        let shifted = table(&[(3, 20), (2, 80)]).normalized();
        for bucket in 0..100 {
            let (before, after) = (
                t.version_for_bucket(bucket),
                shifted.version_for_bucket(bucket),
            );
            assert!(
                before == after || (before, after) == (2, 3),
                "bucket {bucket}"
            );
        }
    }

    #[test]
    fn invalid_tables_name_the_problem() {
        let cases: &[(&[(u32, u32)], &str)] = &[
            (&[], "between 1 and 10"),
            (&[(1, 50), (2, 40)], "sum to 90"),
            (&[(1, 50), (1, 50)], "more than once"),
            (&[(1, 101)], "out of range"),
            (&[(0, 100)], "start at 1"),
        ];
        for (pairs, needle) in cases {
            let e = table(pairs).validate().unwrap_err();
            assert!(e.to_string().contains(needle), "{pairs:?}: {e}");
        }
        let eleven: Vec<(u32, u32)> = (1..=11).map(|v| (v, if v == 1 { 90 } else { 1 })).collect();
        assert!(table(&eleven).validate().is_err());
    }

    #[test]
    fn alias_names_follow_the_rule() {
        validate_alias_name("prod").unwrap();
        validate_alias_name("canary-2_b").unwrap();
        for bad in ["", "2prod", "Prod", "a b", &"a".repeat(65)] {
            assert!(validate_alias_name(bad).is_err(), "{bad}");
        }
    }
}
