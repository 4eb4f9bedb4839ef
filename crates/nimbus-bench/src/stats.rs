//! Latency statistics: nearest-rank percentiles and the per-phase latency summary.

use serde::Serialize;

/// Nearest-rank percentile (`p` in 0–100) of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summary of latency samples, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Samples.
    pub samples: usize,
    /// Mean.
    pub mean_us: f64,
    /// Minimum.
    pub min_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 95th percentile.
    pub p95_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Maximum.
    pub max_us: f64,
}

impl Latency {
    /// Summarizes samples in nanoseconds (sorts them).
    pub fn from_ns(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        let n = samples.len();
        Latency {
            samples: n,
            mean_us: if n == 0 {
                0.0
            } else {
                samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0
            },
            min_us: us(samples.first().copied().unwrap_or(0)),
            p50_us: us(percentile(samples, 50.0)),
            p90_us: us(percentile(samples, 90.0)),
            p95_us: us(percentile(samples, 95.0)),
            p99_us: us(percentile(samples, 99.0)),
            max_us: us(samples.last().copied().unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), 2);
    }

    #[test]
    fn latency_summary_is_in_microseconds() {
        let mut ns = vec![3000, 1000, 2000, 4000];
        let l = Latency::from_ns(&mut ns);
        assert_eq!(l.samples, 4);
        assert_eq!(l.min_us, 1.0);
        assert_eq!(l.p50_us, 2.0);
        assert_eq!(l.max_us, 4.0);
        assert_eq!(l.mean_us, 2.5);
        assert_eq!(Latency::from_ns(&mut []).p50_us, 0.0);
    }
}
