//! The one markdown table a suite run prints and writes.

use std::fmt::Write;

use crate::load::Stats;

/// One line of the table.
pub struct Row {
    pub what: String,
    /// Throughput (per second) of successful requests or operations.
    pub rate: Option<f64>,
    /// Shown in the rate column when there is no rate (e.g. memory).
    pub figure: Option<String>,
    pub stats: Option<LatencySummary>,
    pub failed: String,
    /// The measured figure divided by its ceiling or baseline, with what that is.
    pub ratio: Option<(f64, String)>,
    /// The target and whether it is met.
    pub target: Option<(String, bool)>,
}

pub struct LatencySummary {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySummary {
    pub fn of(stats: &Stats) -> Self {
        LatencySummary {
            p50: stats.ms(0.50),
            p90: stats.ms(0.90),
            p99: stats.ms(0.99),
            max: stats.max_ms(),
        }
    }
}

/// Failures as "n (status: count, ...)", or "0". Status 0 is a transport error.
pub fn failures(stats: &Stats) -> String {
    if stats.failed == 0 {
        return "0".to_owned();
    }
    let by_status: Vec<String> = stats
        .failures
        .iter()
        .map(|(status, n)| match status {
            0 => format!("io: {n}"),
            s => format!("{s}: {n}"),
        })
        .collect();
    format!("{} ({})", stats.failed, by_status.join(", "))
}

impl Row {
    pub fn measured(what: impl Into<String>, rate: f64, stats: &Stats) -> Self {
        Row {
            what: what.into(),
            rate: Some(rate),
            figure: None,
            stats: Some(LatencySummary::of(stats)),
            failed: failures(stats),
            ratio: None,
            target: None,
        }
    }

    pub fn ceiling(what: impl Into<String>, rate: f64) -> Self {
        Row {
            what: what.into(),
            rate: Some(rate),
            figure: None,
            stats: None,
            failed: String::new(),
            ratio: None,
            target: None,
        }
    }

    /// A figure that is not a rate, with an upper bound: `value` ≤ `bound` (in `unit`).
    pub fn bounded(what: impl Into<String>, value: f64, bound: f64, unit: &str) -> Self {
        Row {
            target: Some((format!("≤ {bound} {unit}"), value <= bound)),
            ..Row::figure(what, value, unit)
        }
    }

    /// A figure with no target.
    pub fn figure(what: impl Into<String>, value: f64, unit: &str) -> Self {
        Row {
            what: what.into(),
            rate: None,
            figure: Some(format!("{value:.0} {unit}")),
            stats: None,
            failed: String::new(),
            ratio: None,
            target: None,
        }
    }

    /// A count that must be zero (a correctness check).
    pub fn none_allowed(what: impl Into<String>, count: u64) -> Self {
        Row {
            what: what.into(),
            rate: None,
            figure: Some(count.to_string()),
            stats: None,
            failed: String::new(),
            ratio: None,
            target: Some(("= 0".to_owned(), count == 0)),
        }
    }

    /// Adds the ratio `value / base` against `base_name`, and a target: at least
    /// `min` or, when `at_most`, at most it.
    pub fn against(
        mut self,
        value: f64,
        base: f64,
        base_name: &str,
        bound: f64,
        at_most: bool,
    ) -> Self {
        let ratio = if base > 0.0 { value / base } else { f64::NAN };
        self.ratio = Some((ratio, base_name.to_owned()));
        let met = if at_most {
            ratio <= bound
        } else {
            ratio >= bound
        };
        let sign = if at_most { "≤" } else { "≥" };
        self.target = Some((format!("{sign} {bound}"), met));
        self
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Renders the table, with the run's parameters as a heading line above it.
pub fn table(heading: &str, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{heading}\n");
    out.push_str("| measurement | per second | p50 ms | p90 ms | p99 ms | max ms | failed | ratio | target |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|---|---|\n");
    for row in rows {
        let rate = match (row.rate, &row.figure) {
            (Some(r), _) => format!("{r:.0}"),
            (None, Some(f)) => f.clone(),
            (None, None) => String::new(),
        };
        let lat = row.stats.as_ref().map_or([""; 4].map(String::from), |s| {
            [ms(s.p50), ms(s.p90), ms(s.p99), ms(s.max)]
        });
        let ratio = row
            .ratio
            .as_ref()
            .map_or(String::new(), |(r, base)| match r.is_nan() {
                true => format!("{base} not measured"),
                false => format!("{r:.2} × {base}"),
            });
        let measured = row.ratio.as_ref().is_none_or(|(r, _)| !r.is_nan());
        let target = row.target.as_ref().map_or(String::new(), |(t, met)| {
            let verdict = match (measured, met) {
                (false, _) => "not measured",
                (true, true) => "met",
                (true, false) => "**missed**",
            };
            format!("{t}: {verdict}")
        });
        let _ = writeln!(
            out,
            "| {} | {rate} | {} | {} | {} | {} | {} | {ratio} | {target} |",
            row.what, lat[0], lat[1], lat[2], lat[3], row.failed
        );
    }
    out
}
