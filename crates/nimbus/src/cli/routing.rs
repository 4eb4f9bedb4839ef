//! Alias routing tables on the command line: parsing `--weights 2=90,3=10` and showing a
//! split, compactly (`v2 90% · v3 10%`) or as a table with bars.

use clap::Args;
use nimbus_core::{RoutingConfig, WeightedVersion};

use super::table::Table;

/// Where an alias sends its traffic: a weighted split or a single version.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct RoutingArgs {
    /// Split traffic by weight: comma-separated VERSION=WEIGHT pairs summing to 100.
    #[arg(long, value_name = "V=W,…", value_parser = parse_weights)]
    pub weights: Option<RoutingConfig>,
    /// Send all traffic to this version.
    #[arg(long, value_name = "N")]
    pub version: Option<u32>,
}

impl RoutingArgs {
    /// The routing table the flags describe, if any was given.
    pub fn routing(&self) -> Option<RoutingConfig> {
        self.weights
            .clone()
            .or_else(|| self.version.map(RoutingConfig::single))
    }
}

/// Parses `--weights`: `VERSION=WEIGHT` pairs separated by commas, spaces allowed.
///
/// Only the syntax is checked here; the server's validation names any problem with the
/// numbers (sum, duplicates, unknown versions) better than a second copy of its rules could.
pub fn parse_weights(s: &str) -> Result<RoutingConfig, String> {
    if s.trim().is_empty() {
        return Err("expected VERSION=WEIGHT pairs, e.g. 2=90,3=10".into());
    }
    let weights = s
        .split(',')
        .map(|pair| {
            let pair = pair.trim();
            let (version, weight) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not VERSION=WEIGHT (e.g. 2=90,3=10)"))?;
            let number = |part: &str, what: &str| {
                part.trim().parse::<u32>().map_err(|_| {
                    format!(
                        "{:?} in {pair:?} is not a {what} (a whole number)",
                        part.trim()
                    )
                })
            };
            Ok(WeightedVersion {
                version: number(version, "version")?,
                weight: number(weight, "weight")?,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(RoutingConfig { weights })
}

/// `v2 90% · v3 10%`.
pub fn compact(routing: &RoutingConfig) -> String {
    routing
        .weights
        .iter()
        .map(|w| format!("v{} {}%", w.version, w.weight))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// The split as a VERSION / WEIGHT / SPLIT table, one bar character per 2 percent (rounded
/// up, so a small canary still shows).
pub fn split_table(routing: &RoutingConfig) -> String {
    let mut table = Table::new(&["version", "weight", "split"]);
    for w in &routing.weights {
        table.row([
            w.version.to_string(),
            format!("{}%", w.weight),
            "█".repeat(w.weight.div_ceil(2) as usize),
        ]);
    }
    table.text()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(pairs: &[(u32, u32)]) -> RoutingConfig {
        RoutingConfig {
            weights: pairs
                .iter()
                .map(|&(version, weight)| WeightedVersion { version, weight })
                .collect(),
        }
    }

    #[test]
    fn weights_parse_with_spaces() {
        assert_eq!(
            parse_weights("2=90,3=10").unwrap(),
            routes(&[(2, 90), (3, 10)])
        );
        assert_eq!(
            parse_weights(" 2 = 90 , 3= 10 ").unwrap(),
            routes(&[(2, 90), (3, 10)])
        );
        assert_eq!(parse_weights("7=100").unwrap(), routes(&[(7, 100)]));
    }

    #[test]
    fn malformed_weights_are_named() {
        assert_eq!(
            parse_weights("2:90").unwrap_err(),
            r#""2:90" is not VERSION=WEIGHT (e.g. 2=90,3=10)"#
        );
        assert_eq!(
            parse_weights("2=90,x=10").unwrap_err(),
            r#""x" in "x=10" is not a version (a whole number)"#
        );
        assert_eq!(
            parse_weights("2=9.5").unwrap_err(),
            r#""9.5" in "2=9.5" is not a weight (a whole number)"#
        );
        assert!(parse_weights("2=-1").unwrap_err().contains("weight"));
        assert!(parse_weights("2=90,")
            .unwrap_err()
            .contains("VERSION=WEIGHT"));
        assert!(parse_weights(" ").unwrap_err().contains("VERSION=WEIGHT"));
    }

    #[test]
    fn sums_and_duplicates_are_left_to_the_server() {
        assert_eq!(
            parse_weights("2=50,2=60").unwrap(),
            routes(&[(2, 50), (2, 60)])
        );
    }

    #[test]
    fn routing_args_prefer_what_was_given() {
        let args = RoutingArgs {
            weights: None,
            version: Some(3),
        };
        assert_eq!(args.routing(), Some(routes(&[(3, 100)])));
        let none = RoutingArgs {
            weights: None,
            version: None,
        };
        assert_eq!(none.routing(), None);
    }

    #[test]
    fn compact_text_lists_versions_in_order() {
        assert_eq!(compact(&routes(&[(2, 90), (3, 10)])), "v2 90% · v3 10%");
        assert_eq!(compact(&routes(&[(1, 100)])), "v1 100%");
    }

    #[test]
    fn split_bars_are_proportional() {
        assert_eq!(
            split_table(&routes(&[(2, 90), (3, 9), (4, 1), (5, 0)])),
            format!(
                "VERSION  WEIGHT  SPLIT\n\
                 2        90%     {}\n\
                 3        9%      {}\n\
                 4        1%      █\n\
                 5        0%\n",
                "█".repeat(45),
                "█".repeat(5)
            )
        );
    }
}
