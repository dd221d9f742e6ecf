//! `unidev bench --quick` runs every section and writes a well-formed report: a Markdown
//! file whose tables are rectangular and name every row, JSON whose rows all have
//! finite measurements, and an SVG with a bar per data-path row. The numbers themselves
//! are never checked (they belong to the machine, not to the code).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

/// Rows every run must produce (per backend and mode, the data path has 4 transports).
fn expected_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "floor.eventfd",
        "floor.spin",
        "floor.unix.read",
        "floor.unix.write",
        "memory.map-unmap.fd",
        "memory.map-unmap.no-fd",
        "memory.map-unmap.fd.1000",
        "scale.accept-ms",
        "scale.rss-per-device",
        "scale.threads-per-device",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for op in ["read", "write"] {
        for client in ["unidev", "rust-vmm"] {
            for server in ["unidev", "rust-vmm"] {
                keys.push(format!("control.{op}.{client}-client.{server}-server"));
            }
        }
    }
    for maps in [1, 1000, 65535] {
        keys.push(format!("memory.translate.{maps}"));
        keys.push(format!("memory.find.{maps}"));
    }
    for backend in ["null", "tmpfs"] {
        for transport in [
            "unidev-vhost-user",
            "stock-vhost-user",
            "vfio-user-socket",
            "vfio-user-mmap",
        ] {
            for mode in ["blocking", "adaptive"] {
                for qd in ["qd1", "qd32"] {
                    keys.push(format!("data.{backend}.{transport}.{mode}.{qd}"));
                }
            }
        }
    }
    keys
}

/// Every Markdown table has a header, a separator of the same width and rows of the same
/// width.
fn check_tables(md: &str) {
    let mut width: Option<usize> = None;
    for (n, line) in md.lines().enumerate() {
        if !line.starts_with('|') {
            width = None;
            continue;
        }
        assert!(
            line.ends_with('|'),
            "line {}: unterminated row: {line}",
            n + 1
        );
        let cells = line.matches('|').count() - 1;
        match width {
            None => width = Some(cells),
            Some(w) => assert_eq!(w, cells, "line {}: {cells} cells, table has {w}", n + 1),
        }
    }
}

#[test]
fn quick_run_writes_a_well_formed_report() {
    let dir = common::test_dir("bench-quick");
    let out = dir.join("report");
    let started = Instant::now();
    let run = Command::new(common::unidev_bin())
        .args(["bench", "--quick", "--out"])
        .arg(&out)
        .output()
        .expect("unidev bench starts");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed: {stderr}");
    assert!(
        took < Duration::from_secs(120),
        "--quick took {took:?} (it should stay well under a minute)"
    );

    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert_eq!(
        md.trim_end(),
        String::from_utf8_lossy(&run.stdout).trim_end(),
        "stdout is the report"
    );
    for heading in [
        "# unidev bench --quick",
        "## Floors",
        "## Control path",
        "## Data path",
        "### null backend",
        "### tmpfs backend",
        "## Memory layer",
        "## Scale",
        "## Targets",
    ] {
        assert!(md.contains(heading), "no {heading:?} in the report:\n{md}");
    }
    assert!(md.contains("- Machine: ") && md.contains("- Placement: "));
    assert!(!md.contains("## Failed rows"), "rows failed:\n{md}");
    assert!(!md.contains("NaN") && !md.contains("inf"), "{md}");
    check_tables(&md);
    for key in expected_keys()
        .iter()
        .filter(|k| !k.starts_with("data.") || k.ends_with(".qd1"))
    {
        // The data tables show QD1 and QD32 on one line, named by transport.
        if !key.starts_with("data.") {
            assert!(
                md.contains(&format!("`{key}`")),
                "no row {key} in the report"
            );
        }
    }

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap())
            .expect("bench.json is JSON");
    let rows = json["rows"].as_array().expect("rows");
    for key in expected_keys() {
        let row = rows
            .iter()
            .find(|r| r["key"] == key.as_str())
            .unwrap_or_else(|| panic!("no row {key} in bench.json"));
        assert!(row["error"].is_null(), "{key} failed: {}", row["error"]);
        let reps = row["reps"].as_array().expect("reps");
        assert!(!reps.is_empty(), "{key} has no repetitions");
        for rep in reps {
            let v = rep["value"].as_f64().expect("a number");
            assert!(v.is_finite(), "{key}: {v}");
        }
    }
    let targets = json["targets"].as_array().expect("targets");
    assert!(targets.len() >= 20, "{} targets evaluated", targets.len());
    for t in targets {
        assert!(t["measured"].as_f64().is_some_and(f64::is_finite), "{t}");
        assert!(t["met"].is_boolean(), "{t}");
    }

    let svg = std::fs::read_to_string(out.join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg ") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(
        svg.matches("<rect ").count(),
        1 + 32 + 4,
        "background, a bar per data row, the legend"
    );
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_section_and_bad_options() {
    let dir = common::test_dir("bench-section");
    let out = dir.join("report");
    let run = Command::new(common::unidev_bin())
        .args(["bench", "--quick", "--section", "memory", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success());
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("## Memory layer") && !md.contains("## Data path"));
    check_tables(&md);

    let bad = Command::new(common::unidev_bin())
        .args(["bench", "--section", "everything"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--section"));
    let _ = std::fs::remove_dir_all(&dir);
}
