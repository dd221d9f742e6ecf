//! `unidev-bench --quick` runs every section and writes a well-formed report: a Markdown
//! file whose tables are rectangular and name every row, JSON whose rows all have
//! finite measurements, and an SVG with a bar per data-path row. The numbers themselves
//! are never checked (they belong to the machine, not to the code).
//!
//! The scale section starts the `unidev` daemon, which another package builds: the tests
//! build it (or find it up to date) into the benchmark's own target directory, where the
//! benchmark looks for it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A fresh directory for one test.
fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unidev-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The benchmark binary cargo built for these tests.
fn bench_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_unidev-bench"))
}

/// The `unidev` daemon beside [`bench_bin`], built by cargo first (once per test process;
/// a no-op when it is up to date): cargo builds only this package's binaries for its
/// tests, and `cargo test -p unidev-bench` alone would otherwise find none, or an old one.
fn daemon_bin() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = bench_bin().parent().expect("the benchmark's directory");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace root");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "-p", "unidev", "--bin", "unidev"])
            .current_dir(workspace);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        if let Some(target_dir) = profile_dir.parent() {
            cargo.arg("--target-dir").arg(target_dir);
        }
        assert!(
            cargo.status().unwrap().success(),
            "cannot build the unidev daemon"
        );
        let daemon = profile_dir.join("unidev");
        assert!(daemon.is_file(), "no daemon at {}", daemon.display());
        daemon
    })
}

/// `unidev-bench` with `args`, finding the daemon beside itself as a user's run does.
fn bench(args: &[&str]) -> Command {
    daemon_bin();
    let mut cmd = Command::new(bench_bin());
    cmd.args(args).env_remove("UNIDEV_BIN");
    cmd
}

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
    let dir = test_dir("bench-quick");
    let out = dir.join("report");
    // Built (or found up to date) before the clock starts.
    daemon_bin();
    let started = Instant::now();
    let run = bench(&["--quick", "--out"])
        .arg(&out)
        .output()
        .expect("unidev-bench starts");
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
    let dir = test_dir("bench-section");
    let out = dir.join("report");
    let run = bench(&["--quick", "--section", "memory", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(run.status.success());
    let md = std::fs::read_to_string(out.join("bench.md")).unwrap();
    assert!(md.contains("## Memory layer") && !md.contains("## Data path"));
    check_tables(&md);

    let bad = bench(&["--section", "everything"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--section"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_daemon_is_a_clear_error_naming_both_ways_to_give_it() {
    let dir = test_dir("bench-no-daemon");
    let missing = dir.join("no-such-unidev");
    let out = dir.join("report");
    let by_flag = Command::new(bench_bin())
        .args(["--quick", "--section", "scale", "--daemon"])
        .arg(&missing)
        .arg("--out")
        .arg(&out)
        .env_remove("UNIDEV_BIN")
        .output()
        .unwrap();
    let by_env = Command::new(bench_bin())
        .args(["--quick", "--section", "scale", "--out"])
        .arg(&out)
        .env("UNIDEV_BIN", &missing)
        .output()
        .unwrap();
    for (run, from) in [(by_flag, "from --daemon"), (by_env, "from UNIDEV_BIN")] {
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{stderr}");
        for part in [
            &missing.display().to_string(),
            from,
            "--daemon PATH",
            "UNIDEV_BIN=PATH",
        ] {
            assert!(stderr.contains(part), "no {part:?} in: {stderr}");
        }
    }
    // Nothing ran: no report.
    assert!(!out.join("bench.md").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
