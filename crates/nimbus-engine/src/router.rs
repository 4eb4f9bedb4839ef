//! Choosing the version an alias sends an invocation to.
//!
//! Without a session key the choice is uniform random per invocation. With one, the bucket
//! is a stable hash of (function, alias, session key), so a session stays on one version
//! while the weights stand and moves only when its bucket changes hands.

use nimbus_core::RoutingConfig;
use rand::Rng;

/// The version `routing` sends this invocation to.
pub fn pick_version(
    routing: &RoutingConfig,
    function_id: &str,
    alias: &str,
    session_key: Option<&str>,
) -> u32 {
    if let [only] = routing.weights.as_slice() {
        return only.version;
    }
    let bucket = match session_key {
        Some(key) => session_bucket(function_id, alias, key),
        None => rand::rng().random_range(0..100),
    };
    routing.version_for_bucket(bucket)
}

/// A bucket in 0..100 that depends only on its inputs (FNV-1a, stable across builds and servers).
pub fn session_bucket(function_id: &str, alias: &str, session_key: &str) -> u32 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for part in [function_id, alias, session_key] {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    // Fold the high bits in: FNV's low bits alone are poorly mixed for short keys.
    ((hash ^ (hash >> 32)) % 100) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::WeightedVersion;

    fn split(a: u32, b: u32) -> RoutingConfig {
        RoutingConfig {
            weights: vec![
                WeightedVersion {
                    version: 1,
                    weight: a,
                },
                WeightedVersion {
                    version: 2,
                    weight: b,
                },
            ],
        }
    }

    #[test]
    fn random_choice_follows_the_weights() {
        let routing = split(90, 10);
        let n = 20_000;
        let canary = (0..n)
            .filter(|_| pick_version(&routing, "fn_a", "prod", None) == 2)
            .count();
        let share = canary as f64 / n as f64 * 100.0;
        assert!((share - 10.0).abs() < 1.0, "canary share {share:.2}%");
    }

    #[test]
    fn session_keys_are_sticky_and_spread_evenly() {
        let routing = split(90, 10);
        let mut canary = 0;
        for k in 0..1000 {
            let key = format!("user-{k}");
            let first = pick_version(&routing, "fn_a", "prod", Some(&key));
            for _ in 0..5 {
                assert_eq!(pick_version(&routing, "fn_a", "prod", Some(&key)), first);
            }
            canary += usize::from(first == 2);
        }
        assert!(
            (70..=130).contains(&canary),
            "{canary} of 1000 sessions on the canary"
        );
    }

    #[test]
    fn single_version_tables_skip_the_draw() {
        assert_eq!(
            pick_version(&RoutingConfig::single(7), "f", "latest", None),
            7
        );
    }
}
