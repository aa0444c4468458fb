//! Statistics as the store keeps them: counters per (received minute,
//! partner, type) by current status, and processing times in fixed buckets.
//! Reading them costs what the number of counter rows in the window costs,
//! never what the number of events does.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::Status;

/// Upper bounds, in milliseconds, of the processing-time buckets; one more
/// bucket holds everything above the last.
pub const MS_BOUNDS: [i64; 16] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000, 900_000, 3_600_000,
];

/// Buckets of a processing-time histogram: one per bound and the overflow.
pub const MS_BUCKETS: usize = MS_BOUNDS.len() + 1;

/// The bucket a processing time falls in.
pub fn ms_bucket(ms: i64) -> usize {
    MS_BOUNDS.iter().position(|&b| ms <= b).unwrap_or(MS_BOUNDS.len())
}

/// What `GET /events/stats` asks for.
#[derive(Debug, Clone, Default)]
pub struct StatsQuery {
    pub partner_id: Option<String>,
    /// Events received at or after (rounded down to the counters' precision).
    pub since: Option<DateTime<Utc>>,
    /// Events received before (rounded up to the counters' precision).
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Percentiles {
    pub p50: Option<i64>,
    pub p95: Option<i64>,
    pub p99: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub total: i64,
    pub by_status: BTreeMap<String, i64>,
    pub by_type: BTreeMap<String, i64>,
    /// Received → processed, milliseconds, over processed events, estimated
    /// from the histogram.
    pub processing_ms: Percentiles,
}

/// The counters of one group of events (a type, or everything).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// Events by status, in [`Status::ALL`] order.
    pub by_status: [i64; 5],
    /// Processed events by processing-time bucket.
    pub histogram: [i64; MS_BUCKETS],
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        for (a, b) in self.by_status.iter_mut().zip(other.by_status) {
            *a += b;
        }
        for (a, b) in self.histogram.iter_mut().zip(other.histogram) {
            *a += b;
        }
    }

    pub fn total(&self) -> i64 {
        self.by_status.iter().sum()
    }

    /// The `p`-quantile (0 < p ≤ 1) of the histogram, interpolated linearly
    /// inside its bucket (as Prometheus' `histogram_quantile`); the overflow
    /// bucket answers its lower bound. `None` without processed events.
    pub fn quantile(&self, p: f64) -> Option<i64> {
        let n: i64 = self.histogram.iter().sum();
        if n <= 0 {
            return None;
        }
        let rank = (p * n as f64).ceil().max(1.0);
        let mut below = 0.0;
        for (i, &c) in self.histogram.iter().enumerate() {
            let c = c.max(0) as f64;
            if c > 0.0 && below + c >= rank {
                let lower = if i == 0 { 0 } else { MS_BOUNDS[i - 1] } as f64;
                let Some(&upper) = MS_BOUNDS.get(i) else {
                    return Some(lower as i64);
                };
                let within = (rank - below) / c;
                return Some((lower + (upper as f64 - lower) * within).round() as i64);
            }
            below += c;
        }
        MS_BOUNDS.last().copied()
    }
}

impl Stats {
    /// The answer for counters per type.
    pub fn from_types(per_type: BTreeMap<String, Counts>) -> Stats {
        let mut all = Counts::default();
        let mut by_type = BTreeMap::new();
        for (tipo, c) in &per_type {
            all.add(c);
            let n = c.total();
            if n != 0 {
                by_type.insert(tipo.clone(), n);
            }
        }
        Stats {
            total: all.total(),
            by_status: Status::ALL
                .iter()
                .zip(all.by_status)
                .filter(|(_, n)| *n != 0)
                .map(|(s, n)| (s.as_str().to_owned(), n))
                .collect(),
            by_type,
            processing_ms: Percentiles {
                p50: all.quantile(0.50),
                p95: all.quantile(0.95),
                p99: all.quantile(0.99),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(points: &[(i64, i64)]) -> Counts {
        let mut c = Counts::default();
        for &(ms, n) in points {
            c.histogram[ms_bucket(ms)] += n;
        }
        c
    }

    #[test]
    fn buckets_hold_their_upper_bound() {
        assert_eq!(ms_bucket(0), 0);
        assert_eq!(ms_bucket(5), 0);
        assert_eq!(ms_bucket(6), 1);
        assert_eq!(ms_bucket(3_600_000), MS_BOUNDS.len() - 1);
        assert_eq!(ms_bucket(3_600_001), MS_BOUNDS.len());
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 events between 100 and 250 ms: the median is half way.
        let c = hist(&[(200, 100)]);
        assert_eq!(c.quantile(0.5), Some(175));
        assert_eq!(c.quantile(1.0), Some(250));
        // 90 fast, 10 slow: p50 among the fast, p99 among the slow.
        let c = hist(&[(3, 90), (40_000, 10)]);
        assert!(c.quantile(0.5).is_some_and(|v| v <= 5));
        assert!(c.quantile(0.99).is_some_and(|v| (30_000..=60_000).contains(&v)));
        assert_eq!(Counts::default().quantile(0.5), None);
        // Above the last bound: the bound.
        assert_eq!(hist(&[(10_000_000, 3)]).quantile(0.5), Some(3_600_000));
    }

    #[test]
    fn stats_sum_types_and_skip_empty_groups() {
        let mut a = hist(&[(20, 2)]);
        a.by_status = [1, 0, 0, 2, 0];
        let b = Counts {
            by_status: [0, 0, 0, 0, 3],
            ..Default::default()
        };
        let empty = Counts::default();
        let s = Stats::from_types(BTreeMap::from([
            ("A".to_owned(), a),
            ("B".to_owned(), b),
            ("C".to_owned(), empty),
        ]));
        assert_eq!(s.total, 6);
        assert_eq!(s.by_type, BTreeMap::from([("A".into(), 3), ("B".into(), 3)]));
        assert_eq!(s.by_status.get("dead_lettered"), Some(&3));
        assert_eq!(s.by_status.get("processing"), None);
        assert!(s.processing_ms.p50.is_some_and(|v| (10..=25).contains(&v)));
    }
}
