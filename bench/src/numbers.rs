//! How the report and the plot write numbers: latencies in ns/µs/ms, rates in k/s or M/s,
//! values with their unit, cost ratios. Shared by [`super::report`] (the Markdown
//! tables) and [`super::svg`] (the plot's labels), so that both read the same.

use super::{Kind, Row};

/// `ns` as "850 ns" / "12.3 µs" / "4.56 ms".
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// A rate as "123.4 k/s" or "1.23 M/s".
pub fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k/s", r / 1e3)
    } else {
        format!("{r:.0} /s")
    }
}

/// A row's value in its unit: a latency, a rate or a value with its unit.
pub fn fmt_value(row: &Row, v: f64) -> String {
    match row.kind {
        Kind::Latency => fmt_ns(v),
        Kind::Rate => fmt_rate(v),
        Kind::Value { unit } => {
            if v.abs() >= 100.0 || v == v.trunc() {
                format!("{v:.0} {unit}")
            } else {
                format!("{v:.2} {unit}")
            }
        }
    }
}

/// A cost ratio as "1.23×", or "—" when there is none.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{r:.2}×"),
        None => "—".into(),
    }
}
