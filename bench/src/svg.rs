//! The plot: QD1 median latency (log scale, with the eventfd and spin floors marked) and
//! QD32 IOPS of every data-path configuration, as horizontal bars, one colour per
//! transport.
//!
//! Written by hand rather than with the plotters crate: plotters needs a font backend
//! (`ttf`: font-kit with the system's fontconfig/freetype, or `ab_glyph` with a font file
//! shipped in the repo) to lay out text, which would pull about twenty crates and a
//! system library into the daemon for two bar charts; SVG `<text>` elements are laid out
//! by the viewer instead.

use std::fmt::Write as _;

use super::numbers::{fmt_ns, fmt_rate};
use super::Row;

const WIDTH: f64 = 980.0;
const LABEL_W: f64 = 300.0;
const BAR_H: f64 = 14.0;
const GAP: f64 = 4.0;
const PLOT_W: f64 = WIDTH - LABEL_W - 90.0;

/// One bar: label, value, colour.
struct Bar {
    label: String,
    value: f64,
    colour: &'static str,
}

fn colour(key: &str) -> &'static str {
    if key.contains(".unidev-vhost-user.") {
        "#1f77b4"
    } else if key.contains(".stock-vhost-user.") {
        "#7f7f7f"
    } else if key.contains(".vfio-user-socket.") {
        "#ff7f0e"
    } else {
        "#2ca02c"
    }
}

/// "vfio-user socket · null · blocking" from `data.null.vfio-user-socket.blocking.qd1`.
fn short_label(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let (backend, transport, mode) = match parts.as_slice() {
        [_, b, t, m, _] => (*b, *t, *m),
        _ => return key.to_string(),
    };
    let transport = match transport {
        "unidev-vhost-user" => "vhost-user (unidev)",
        "stock-vhost-user" => "vhost-user (stock daemon)",
        "vfio-user-socket" => "vfio-user, socket doorbell",
        "vfio-user-mmap" => "vfio-user, mmap notify + poll",
        other => other,
    };
    format!("{transport} · {backend} · {mode}")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn bars(rows: &[Row], suffix: &str) -> Vec<Bar> {
    rows.iter()
        .filter(|r| r.key.starts_with("data.") && r.key.ends_with(suffix))
        .filter_map(|r| {
            Some(Bar {
                label: short_label(&r.key),
                value: r.value()?,
                colour: colour(&r.key),
            })
        })
        .collect()
}

/// Draw one chart at `top`; returns its height. `scale` maps a value to 0..=1.
fn chart(
    out: &mut String,
    top: f64,
    title: &str,
    bars: &[Bar],
    scale: &dyn Fn(f64) -> f64,
    fmt: &dyn Fn(f64) -> String,
    marks: &[(String, f64)],
) -> f64 {
    let _ = writeln!(
        out,
        r#"<text x="10" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
        top + 16.0,
        escape(title)
    );
    let y0 = top + 28.0;
    for (i, b) in bars.iter().enumerate() {
        let y = y0 + i as f64 * (BAR_H + GAP);
        let w = (scale(b.value).clamp(0.0, 1.0) * PLOT_W).max(1.0);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"#,
            LABEL_W - 6.0,
            y + BAR_H - 3.0,
            escape(&b.label)
        );
        let _ = writeln!(
            out,
            r#"<rect x="{LABEL_W:.1}" y="{y:.1}" width="{w:.1}" height="{BAR_H:.1}" fill="{}"/>"#,
            b.colour
        );
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            LABEL_W + w + 4.0,
            y + BAR_H - 3.0,
            escape(&fmt(b.value))
        );
    }
    let bottom = y0 + bars.len() as f64 * (BAR_H + GAP);
    for (label, v) in marks {
        let x = LABEL_W + scale(*v).clamp(0.0, 1.0) * PLOT_W;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#d62728" stroke-dasharray="4 3"/>"##,
            y0 - 4.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#d62728">{}</text>"##,
            x + 3.0,
            bottom + 12.0,
            escape(label)
        );
    }
    bottom - top + 24.0
}

/// The SVG document for `rows` (empty charts when the data section did not run).
pub fn plot(rows: &[Row]) -> String {
    let lat = bars(rows, ".qd1");
    let iops = bars(rows, ".qd32");
    let floor = |k: &str| rows.iter().find(|r| r.key == k).and_then(Row::value);
    let mut marks = Vec::new();
    for (k, name) in [
        ("floor.spin", "spin floor"),
        ("floor.eventfd", "eventfd floor"),
    ] {
        if let Some(v) = floor(k) {
            marks.push((format!("{name} {}", fmt_ns(v)), v));
        }
    }
    // Log scale for latency: from a decade below the smallest value to the largest.
    let values = lat.iter().map(|b| b.value).chain(marks.iter().map(|m| m.1));
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() && hi > 0.0 {
        ((lo / 2.0).log10().floor(), hi.log10().ceil())
    } else {
        (0.0, 1.0)
    };
    let log_scale = move |v: f64| (v.max(1e-9).log10() - lo) / (hi - lo).max(1e-9);
    let max_iops = iops.iter().map(|b| b.value).fold(0.0f64, f64::max).max(1.0);
    let lin_scale = move |v: f64| v / max_iops;

    let mut body = String::new();
    let mut top = 10.0;
    top += chart(
        &mut body,
        top,
        "QD1 round trip, median (log scale; shorter is better)",
        &lat,
        &log_scale,
        &|v| fmt_ns(v),
        &marks,
    );
    top += chart(
        &mut body,
        top,
        "QD32 IOPS, 4 KiB reads (longer is better)",
        &iops,
        &lin_scale,
        &|v| fmt_rate(v).replace("/s", " IOPS"),
        &[],
    );
    let legend = [
        ("#1f77b4", "unidev vhost-user"),
        ("#7f7f7f", "stock VhostUserDaemon"),
        ("#ff7f0e", "unidev vfio-user, socket doorbell"),
        (
            "#2ca02c",
            "unidev vfio-user, mmapped notify + polling device",
        ),
    ];
    for (i, (c, name)) in legend.iter().enumerate() {
        let x = 10.0 + (i % 2) as f64 * 360.0;
        let y = top + (i / 2) as f64 * 18.0;
        let _ = writeln!(
            body,
            r#"<rect x="{x:.1}" y="{y:.1}" width="12" height="12" fill="{c}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            x + 16.0,
            y + 10.0,
            escape(name)
        );
    }
    let height = top + 44.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {WIDTH:.0} {height:.0}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}
