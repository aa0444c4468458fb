//! The overview's chart: events per second by type over the last hour, one
//! line per type, drawn as SVG on the server (the CSP lets no script run;
//! colours come from the stylesheet's `.series-N` classes).

use std::collections::BTreeMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};

/// Minutes shown.
pub const MINUTES: i64 = 60;
/// Colours the stylesheet defines; more types reuse them.
const COLOURS: usize = 8;
pub const WIDTH: f64 = 600.0;
pub const HEIGHT: f64 = 180.0;

pub struct Line {
    pub tipo: String,
    /// `series-N`.
    pub class: String,
    /// SVG `points`.
    pub points: String,
    /// Events in the hour.
    pub total: i64,
    /// The busiest minute, events per second.
    pub peak: String,
}

pub struct Chart {
    pub lines: Vec<Line>,
    /// The top of the scale, events per second.
    pub top: String,
    /// What a screen reader says of it.
    pub summary: String,
}

/// The chart of `(minute, tipo, events)` rows for the hour before `now`;
/// a minute without a row had no events.
pub fn build(rows: &[(DateTime<Utc>, String, i64)], now: DateTime<Utc>) -> Chart {
    let this_minute = now.duration_trunc(TimeDelta::minutes(1)).unwrap_or(now);
    let first = this_minute - TimeDelta::minutes(MINUTES - 1);
    let mut per_type: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (minute, tipo, n) in rows {
        let slot = (*minute - first).num_minutes();
        if (0..MINUTES).contains(&slot) {
            per_type.entry(tipo).or_insert_with(|| vec![0; MINUTES as usize])[slot as usize] += n;
        }
    }
    let busiest = per_type.values().flatten().copied().max().unwrap_or(0);
    // Per second, with a scale that is a round number of events a minute.
    let top_per_minute = nice_ceiling(busiest.max(6));
    let x = |i: usize| i as f64 * WIDTH / (MINUTES - 1) as f64;
    let y = |n: i64| HEIGHT - (n as f64 / top_per_minute as f64) * HEIGHT;
    let lines: Vec<Line> = per_type
        .iter()
        .enumerate()
        .map(|(i, (tipo, counts))| Line {
            tipo: (*tipo).to_owned(),
            class: format!("series-{}", i % COLOURS),
            points: counts
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{:.1},{:.1}", x(i), y(*n)))
                .collect::<Vec<_>>()
                .join(" "),
            total: counts.iter().sum(),
            peak: per_second(counts.iter().copied().max().unwrap_or(0)),
        })
        .collect();
    let summary = if lines.is_empty() {
        "No events received in the last hour.".to_owned()
    } else {
        lines
            .iter()
            .map(|l| format!("{}: {} events, peak {}/s", l.tipo, l.total, l.peak))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Chart {
        lines,
        top: per_second(top_per_minute),
        summary,
    }
}

/// Events a minute as events per second, to two significant places.
fn per_second(per_minute: i64) -> String {
    let v = per_minute as f64 / 60.0;
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The smallest of 1, 2, 5 × 10ⁿ (times 6, a minute's tenth of a second
/// granularity aside) at or above `n`.
fn nice_ceiling(n: i64) -> i64 {
    let mut base = 6;
    loop {
        for m in [1, 2, 5] {
            if base * m >= n {
                return base * m;
            }
        }
        base *= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
    }

    #[test]
    fn one_line_per_type_with_its_minutes() {
        let now = at("2026-12-07T10:30:20Z");
        let rows = vec![
            (at("2026-12-07T10:30:00Z"), "VENDA".to_owned(), 120),
            (at("2026-12-07T10:29:00Z"), "VENDA".to_owned(), 60),
            (at("2026-12-07T09:31:00Z"), "DEVOLUÇÃO".to_owned(), 6),
            // Outside the hour.
            (at("2026-12-07T09:30:00Z"), "DEVOLUÇÃO".to_owned(), 600),
        ];
        let c = build(&rows, now);
        assert_eq!(c.lines.len(), 2);
        let venda = c.lines.iter().find(|l| l.tipo == "VENDA").expect("VENDA");
        assert_eq!(venda.total, 180);
        assert_eq!(venda.peak, "2.0");
        let points: Vec<&str> = venda.points.split(' ').collect();
        assert_eq!(points.len(), MINUTES as usize);
        // The last minute is at the right edge, at the top of a 120/min scale.
        assert_eq!(points[59], "600.0,0.0");
        assert_eq!(points[58], "589.8,90.0");
        assert_eq!(c.top, "2.0");
        let dev = c.lines.iter().find(|l| l.tipo == "DEVOLUÇÃO").expect("DEVOLUÇÃO");
        assert_eq!(dev.total, 6);
        assert!(dev.points.starts_with("0.0,171.0 "), "{}", dev.points);
        assert!(c.summary.contains("VENDA: 180 events"), "{}", c.summary);
    }

    #[test]
    fn no_events_is_said() {
        let c = build(&[], Utc::now());
        assert!(c.lines.is_empty());
        assert_eq!(c.summary, "No events received in the last hour.");
    }

    #[test]
    fn scales_are_round() {
        assert_eq!(nice_ceiling(1), 6);
        assert_eq!(nice_ceiling(7), 12);
        assert_eq!(nice_ceiling(121), 300);
        assert_eq!(nice_ceiling(3000), 3000);
    }
}
