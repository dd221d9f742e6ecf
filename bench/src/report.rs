//! The report of a run: `bench.md` (the machine, how the run was placed, one table per
//! section with medians, spread and ratios to floors and peers, and the targets met or
//! missed), `bench.json` (every repetition) and `bench.svg` (latency and IOPS per
//! transport, drawn by [`super::svg`]).

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::numbers::{fmt_ns, fmt_rate, fmt_ratio, fmt_value};
use super::{Row, Section};

/// How the run went, for the report's header.
#[derive(Serialize)]
pub struct RunInfo {
    /// `--quick`.
    pub quick: bool,
    /// Repetitions per case.
    pub reps: usize,
    /// How threads were pinned.
    pub placement: String,
    /// Wall time of the run.
    pub seconds: f64,
    /// 1-minute load average before and after.
    pub load_before: Option<f64>,
    /// 1-minute load average after the run.
    pub load_after: Option<f64>,
    /// Sections that ran.
    pub sections: Vec<Section>,
}

/// The 1-minute load average.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One line describing the machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    // Online CPUs (not this thread's affinity, which the run narrows to one).
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let clock =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
    format!("{model}, {cpus} CPUs, {mem_gib:.0} GiB RAM, Linux {kernel}, clocksource {clock}")
}

/// A limit on a row: against another row (a ratio of costs) or an absolute value.
pub struct Target {
    /// What the target says.
    pub text: String,
    /// The row it applies to.
    pub row: String,
    /// The row it is compared with; `None`: the limit is absolute.
    pub against: Option<String>,
    /// Largest allowed cost ratio (or value).
    pub limit: f64,
}

/// How a target came out.
#[derive(Serialize)]
pub struct TargetResult {
    /// What the target says.
    pub text: String,
    /// The row.
    pub row: String,
    /// What it was compared with.
    pub against: Option<String>,
    /// The limit.
    pub limit: f64,
    /// The measured ratio or value.
    pub measured: f64,
    /// Whether it is within the limit.
    pub met: bool,
}

/// Every target of the issue, as rows of this suite.
pub fn targets() -> Vec<Target> {
    let mut t = Vec::new();
    let ratio = |text: String, row: String, against: String, limit: f64| Target {
        text,
        row,
        against: Some(against),
        limit,
    };
    for backend in ["null", "tmpfs"] {
        for mode in ["blocking", "adaptive"] {
            for (qd, what) in [("qd1", "QD1 median"), ("qd32", "QD32 IOPS")] {
                t.push(ratio(
                    format!(
                        "unidev vhost-user ≤ stock VhostUserDaemon ({backend}, {mode}, {what})"
                    ),
                    format!("data.{backend}.unidev-vhost-user.{mode}.{qd}"),
                    format!("data.{backend}.stock-vhost-user.{mode}.{qd}"),
                    1.0,
                ));
                t.push(ratio(
                    format!("vfio-user virtio-pci ≤ 1.10× vhost-user ({backend}, {mode}, {what})"),
                    format!("data.{backend}.vfio-user-socket.{mode}.{qd}"),
                    format!("data.{backend}.unidev-vhost-user.{mode}.{qd}"),
                    1.10,
                ));
            }
        }
    }
    for transport in ["unidev-vhost-user", "vfio-user-mmap"] {
        t.push(ratio(
            format!("QD1 with polling ≤ 5× spin floor ({transport}, null)"),
            format!("data.null.{transport}.adaptive.qd1"),
            "floor.spin".into(),
            5.0,
        ));
    }
    for op in ["read", "write"] {
        t.push(ratio(
            format!(
                "control path ≤ 1.15× AF_UNIX floor (REGION_{})",
                op.to_uppercase()
            ),
            format!("control.{op}.unidev-client.unidev-server"),
            format!("floor.unix.{op}"),
            1.15,
        ));
    }
    t.push(ratio(
        "translation at 65,535 maps ≤ 2× 1 map".into(),
        "memory.translate.65535".into(),
        "memory.translate.1".into(),
        2.0,
    ));
    t.push(Target {
        text: "64 idle devices: ≤ 256 KiB resident each".into(),
        row: "scale.rss-per-device".into(),
        against: None,
        limit: 256.0,
    });
    t.push(Target {
        text: "64 idle devices: ≤ 1 thread each".into(),
        row: "scale.threads-per-device".into(),
        against: None,
        limit: 1.0,
    });
    t
}

/// Evaluate the targets whose rows were measured.
pub fn evaluate(rows: &[Row]) -> Vec<TargetResult> {
    let find = |k: &str| rows.iter().find(|r| r.key == k && !r.reps.is_empty());
    targets()
        .into_iter()
        .filter_map(|t| {
            let row = find(&t.row)?;
            let measured = match &t.against {
                Some(a) => row.cost_ratio(find(a)?)?,
                None => row.value()?,
            };
            Some(TargetResult {
                met: measured <= t.limit,
                text: t.text,
                row: t.row,
                against: t.against,
                limit: t.limit,
                measured,
            })
        })
        .collect()
}

fn ratio_to(rows: &[Row], row: &Row, other: &Option<String>) -> Option<f64> {
    let o = rows.iter().find(|r| Some(&r.key) == other.as_ref())?;
    row.cost_ratio(o)
}

/// The generic table of one section.
fn section_table(out: &mut String, rows: &[Row], section: Section) {
    let _ = writeln!(
        out,
        "| Row | Median | p99 | Spread | × floor | × peer | Key |\n|---|---:|---:|---:|---:|---:|---|"
    );
    for row in rows.iter().filter(|r| r.section == section) {
        if let Some(e) = &row.error {
            let _ = writeln!(
                out,
                "| {} | failed | — | — | — | — | `{}` |",
                row.label, row.key
            );
            let _ = e;
            continue;
        }
        let median = row.value().map(|v| fmt_value(row, v)).unwrap_or("—".into());
        let p99 = row.p99().map(fmt_ns).unwrap_or("—".into());
        let spread = row
            .spread()
            .map(|s| format!("±{:.0}%", 50.0 * s))
            .unwrap_or("—".into());
        let _ = writeln!(
            out,
            "| {} | {median} | {p99} | {spread} | {} | {} | `{}` |",
            row.label,
            fmt_ratio(ratio_to(rows, row, &row.floor)),
            fmt_ratio(ratio_to(rows, row, &row.peer)),
            row.key
        );
    }
}

fn spread_text(row: Option<&Row>) -> String {
    row.and_then(Row::spread)
        .map(|s| format!("±{:.0}%", 50.0 * s))
        .unwrap_or("—".into())
}

/// The data path as one table per backend: a line per transport and mode, QD1 and QD32
/// side by side.
fn data_tables(out: &mut String, rows: &[Row]) {
    let find = |k: &str| rows.iter().find(|r| r.key == k);
    for backend in ["null", "tmpfs"] {
        if !rows
            .iter()
            .any(|r| r.key.starts_with(&format!("data.{backend}.")))
        {
            continue;
        }
        let _ = writeln!(
            out,
            "### {backend} backend\n\n\
             | Transport | Mode | QD1 median | QD1 p99 | × floor | × peer | QD32 IOPS | × peer | Spread QD1 / QD32 |\n\
             |---|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for mode in ["blocking", "adaptive"] {
            for r in rows.iter().filter(|r| {
                r.key.starts_with(&format!("data.{backend}."))
                    && r.key.ends_with(&format!(".{mode}.qd1"))
            }) {
                let transport = r
                    .label
                    .split(&format!(", {backend} backend"))
                    .next()
                    .unwrap_or(&r.label);
                let deep = find(&r.key.replace(".qd1", ".qd32"));
                if r.error.is_some() {
                    let _ = writeln!(out, "| {transport} | {mode} | failed | | | | | | |");
                    continue;
                }
                let _ = writeln!(
                    out,
                    "| {transport} | {mode} | {} | {} | {} | {} | {} | {} | {} / {} |",
                    r.value().map(fmt_ns).unwrap_or("—".into()),
                    r.p99().map(fmt_ns).unwrap_or("—".into()),
                    fmt_ratio(ratio_to(rows, r, &r.floor)),
                    fmt_ratio(ratio_to(rows, r, &r.peer)),
                    deep.and_then(Row::value)
                        .map(|v| fmt_rate(v).replace("/s", ""))
                        .unwrap_or("—".into()),
                    fmt_ratio(deep.and_then(|d| ratio_to(rows, d, &d.peer))),
                    spread_text(Some(r)),
                    spread_text(deep),
                );
            }
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "Floors: blocking rows against the eventfd ping-pong, adaptive rows against the spin \
         ping-pong. Peers: unidev vhost-user against the stock VhostUserDaemon, the vfio-user \
         rows against unidev vhost-user (same backend, same mode). The stock daemon cannot \
         poll: in adaptive mode only its driver polls.\n\n![QD1 latency and QD32 IOPS per \
         transport](bench.svg)\n"
    );
}

/// The Markdown report.
pub fn markdown(rows: &[Row], run: &RunInfo) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# unidev bench{}\n",
        if run.quick { " --quick" } else { "" }
    );
    let _ = writeln!(out, "- Machine: {}", machine());
    let _ = writeln!(out, "- Placement: {}", run.placement);
    let load = |l: Option<f64>| l.map(|v| format!("{v:.2}")).unwrap_or("?".into());
    let _ = writeln!(
        out,
        "- Repetitions per row: {} (round-robin over the rows of a section); run took {:.0} s; \
         1-minute load average {} before, {} after",
        run.reps,
        run.seconds,
        load(run.load_before),
        load(run.load_after)
    );
    let _ = writeln!(
        out,
        "- Median: median over repetitions of each repetition's median (latency) or rate; \
         p99: median of the repetitions' 99th percentiles; spread: ±half the range of the \
         repetitions' medians, relative. × floor / × peer: cost ratio (latency ratio, or \
         inverse IOPS ratio; > 1 is slower than the floor or the peer), the median of the \
         per-repetition ratios.\n"
    );
    for &section in &run.sections {
        if !rows.iter().any(|r| r.section == section) {
            continue;
        }
        let _ = writeln!(out, "## {}\n", section.title());
        if section == Section::Data {
            data_tables(&mut out, rows);
            continue;
        }
        section_table(&mut out, rows, section);
        out.push('\n');
    }
    let results = evaluate(rows);
    if !results.is_empty() {
        let _ = writeln!(
            out,
            "## Targets\n\n| Target | Measured | Limit | Result |\n|---|---:|---:|---|"
        );
        for r in &results {
            let measured = if r.against.is_some() {
                format!("{:.2}×", r.measured)
            } else {
                format!("{:.2}", r.measured)
            };
            let verdict = if r.met {
                "met".to_string()
            } else {
                format!("missed by {:.1}%", 100.0 * (r.measured / r.limit - 1.0))
            };
            let _ = writeln!(
                out,
                "| {} | {measured} | {} | {verdict} |",
                r.text,
                if r.against.is_some() {
                    format!("{:.2}×", r.limit)
                } else {
                    format!("{}", r.limit)
                }
            );
        }
        out.push('\n');
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| r.error.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "## Failed rows\n");
        for r in failed {
            let _ = writeln!(
                out,
                "- `{}`: {}",
                r.key,
                r.error.as_deref().unwrap_or_default()
            );
        }
    }
    out
}

#[derive(Serialize)]
struct JsonReport<'a> {
    machine: String,
    run: &'a RunInfo,
    rows: &'a [Row],
    targets: Vec<TargetResult>,
}

/// Write bench.md, bench.json (and bench.svg) into `dir`; returns the Markdown.
pub fn write(dir: &Path, rows: &[Row], run: &RunInfo) -> Result<String, String> {
    let md = markdown(rows, run);
    let put = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    put("bench.md", &md)?;
    let json = serde_json::to_string_pretty(&JsonReport {
        machine: machine(),
        run,
        rows,
        targets: evaluate(rows),
    })
    .map_err(|e| format!("cannot encode the JSON report: {e}"))?;
    put("bench.json", &json)?;
    put("bench.svg", &super::svg::plot(rows))?;
    Ok(md)
}
