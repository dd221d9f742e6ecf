//! `unidev-bench`: every transport side by side on the same backend, against the floors
//! (what the machine needs for the same hand-offs with nothing of unidev in between) and
//! the peers (rust-vmm's vfio-user server, vhost-user-backend's stock daemon), in one
//! run, with every row pinned the same way ([`pin`]).
//!
//! A binary of its own, not a subcommand of the daemon: it links the peers it measures
//! against (rust-vmm's `vfio_user` and `vfio-bindings`) and the virtio driver it measures
//! with, which the shipped `unidev` binary must not carry. Its scale section starts that
//! daemon as a child ([`scale`], [`find_daemon`]).
//!
//! Sections: floors and control path ([`control`]), data path ([`datapath`]), memory
//! layer ([`memory`]) and scale ([`scale`]). Each section is a list of cases; the
//! repetitions run round-robin over the cases (case 1, case 2, ..., case 1, ...), so a
//! burst of load elsewhere on the machine spreads over every row instead of sinking one.
//! [`report`] writes the Markdown table and the JSON data, [`svg`] the plot, both with
//! the number formats of [`numbers`].

mod control;
mod datapath;
mod floors;
mod memory;
mod numbers;
mod pin;
mod report;
mod scale;
mod stats;
mod svg;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use log::error;
use serde::Serialize;

use pin::Placement;

/// The environment variable naming the daemon binary, when `--daemon` is not given.
const DAEMON_ENV: &str = "UNIDEV_BIN";

/// `unidev-bench` options.
#[derive(Parser, Debug)]
#[command(
    name = "unidev-bench",
    version,
    about = "Measure every transport side by side (floors, peers, control and data path, \
             memory layer, scale) and write a Markdown/JSON/SVG report"
)]
pub struct BenchArgs {
    /// Fewer and shorter repetitions: finishes in under a minute (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// Directory for the report: bench.md (tables), bench.svg (plot), bench.json (data).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Run only these sections (repeatable; default: all).
    #[arg(long = "section", value_enum)]
    pub sections: Vec<Section>,
    /// Run only the cases whose row keys contain one of these comma-separated texts (for
    /// profiling a row; the floors and peers it is compared with may then be missing).
    #[arg(long)]
    pub only: Option<String>,
    /// The `unidev` daemon the scale section starts (default: $UNIDEV_BIN, else the
    /// `unidev` beside this executable, as cargo builds them into one target directory).
    #[arg(long, value_name = "PATH")]
    pub daemon: Option<PathBuf>,
}

/// A part of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    /// eventfd, spin and AF_UNIX floors.
    Floors,
    /// vfio-user REGION_READ/REGION_WRITE round trips.
    Control,
    /// virtio-blk QD1 latency and QD32 IOPS over every transport.
    Data,
    /// DMA map/unmap rate and address translation.
    Memory,
    /// 64 idle devices in one daemon.
    Scale,
}

impl Section {
    const ALL: [Section; 5] = [
        Section::Floors,
        Section::Control,
        Section::Data,
        Section::Memory,
        Section::Scale,
    ];

    fn title(self) -> &'static str {
        match self {
            Section::Floors => "Floors",
            Section::Control => "Control path (vfio-user, 4-byte region accesses)",
            Section::Data => "Data path (virtio-blk, 4 KiB reads)",
            Section::Memory => "Memory layer (DmaSpace)",
            Section::Scale => "Scale (64 idle virtio-blk devices in one daemon)",
        }
    }
}

/// What a row measures, and which way is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Per-operation times in ns (median and p99 per repetition); lower is better.
    Latency,
    /// Operations per second; higher is better.
    Rate,
    /// One number per repetition, in `unit`; lower is better.
    Value {
        /// Unit shown after the number.
        unit: &'static str,
    },
}

/// What one repetition of a case produced.
pub enum Measured {
    /// Per-operation times, ns.
    Latency(Vec<f64>),
    /// `ops` operations in `secs` seconds.
    Rate {
        /// Operations completed.
        ops: u64,
        /// Seconds they took.
        secs: f64,
    },
    /// One value.
    Value(f64),
}

/// One repetition, summarized.
#[derive(Clone, Debug, Serialize)]
pub struct Rep {
    /// Median latency (ns), rate (ops/s) or the value.
    pub value: f64,
    /// 99th percentile latency (ns), latency rows only.
    pub p99: Option<f64>,
    /// Operations or samples behind it.
    pub count: u64,
}

/// A row of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The section it belongs to.
    pub section: Section,
    /// Stable identifier (`data.null.vhost-user.blocking.qd1`), used by ratios and
    /// checks.
    pub key: String,
    /// What a reader sees.
    pub label: String,
    /// What is measured.
    pub kind: Kind,
    /// Key of the floor row this one is compared with.
    pub floor: Option<String>,
    /// Key of the peer row this one is compared with.
    pub peer: Option<String>,
    /// The repetitions.
    pub reps: Vec<Rep>,
    /// Why the row has no numbers, if it failed.
    pub error: Option<String>,
}

impl Row {
    /// Median over repetitions of each repetition's main value.
    pub fn value(&self) -> Option<f64> {
        let v: Vec<f64> = self.reps.iter().map(|r| r.value).collect();
        (!v.is_empty()).then(|| stats::median(&v))
    }

    /// Median over repetitions of the p99.
    pub fn p99(&self) -> Option<f64> {
        let v: Vec<f64> = self.reps.iter().filter_map(|r| r.p99).collect();
        (!v.is_empty()).then(|| stats::median(&v))
    }

    /// (max - min) / median of the repetitions' main values.
    pub fn spread(&self) -> Option<f64> {
        let v: Vec<f64> = self.reps.iter().map(|r| r.value).collect();
        (v.len() > 1).then(|| stats::relative_spread(&v))
    }

    /// How much more this row costs than `other` (>1: worse): the latency or value
    /// ratio, or the inverse rate ratio. With the same number of repetitions (the rows
    /// ran round-robin, repetition i of both close together in time) it is the median of
    /// the per-repetition ratios, which a machine whose speed drifts between repetitions
    /// disturbs least; otherwise the ratio of the medians.
    pub fn cost_ratio(&self, other: &Row) -> Option<f64> {
        let cost = |a: f64, b: f64| match self.kind {
            Kind::Rate => b / a,
            _ => a / b,
        };
        let r = if !self.reps.is_empty() && self.reps.len() == other.reps.len() {
            let per_rep: Vec<f64> = self
                .reps
                .iter()
                .zip(&other.reps)
                .map(|(a, b)| cost(a.value, b.value))
                .collect();
            stats::median(&per_rep)
        } else {
            cost(self.value()?, other.value()?)
        };
        r.is_finite().then_some(r)
    }
}

/// A row a case fills.
pub struct RowSpec {
    key: String,
    label: String,
    kind: Kind,
    floor: Option<String>,
    peer: Option<String>,
}

impl RowSpec {
    /// Row `key` (shown as `label`) measuring `kind`.
    pub fn new(key: impl Into<String>, label: impl Into<String>, kind: Kind) -> Self {
        RowSpec {
            key: key.into(),
            label: label.into(),
            kind,
            floor: None,
            peer: None,
        }
    }

    /// Compare with the floor row `key`.
    pub fn floor(mut self, key: impl Into<String>) -> Self {
        self.floor = Some(key.into());
        self
    }

    /// Compare with the peer row `key`.
    pub fn peer(mut self, key: impl Into<String>) -> Self {
        self.peer = Some(key.into());
        self
    }
}

type CaseRun<'a> = Box<dyn FnMut() -> Result<Vec<Measured>, String> + 'a>;

/// One measurement to repeat; it fills one or more rows per repetition.
pub struct Case<'a> {
    specs: Vec<RowSpec>,
    run: CaseRun<'a>,
}

impl<'a> Case<'a> {
    /// A case filling one row by calling `run` once per repetition.
    pub fn new(spec: RowSpec, mut run: impl FnMut() -> Result<Measured, String> + 'a) -> Self {
        Case {
            specs: vec![spec],
            run: Box::new(move || run().map(|m| vec![m])),
        }
    }

    /// A case filling `specs.len()` rows; `run` returns one measurement per row.
    pub fn multi(
        specs: Vec<RowSpec>,
        run: impl FnMut() -> Result<Vec<Measured>, String> + 'a,
    ) -> Self {
        Case {
            specs,
            run: Box::new(run),
        }
    }
}

/// Settings every section reads.
pub struct Settings {
    /// `--quick`.
    pub quick: bool,
    /// Repetitions of every case.
    pub reps: usize,
    /// The CPUs.
    pub placement: Placement,
    /// Scratch space (sockets, images): on tmpfs when /dev/shm exists.
    pub work_dir: PathBuf,
    /// `--only`.
    pub only: Option<String>,
    /// The daemon the scale section starts ([`find_daemon`]; found before any section
    /// runs when scale is one of them).
    pub daemon: Option<PathBuf>,
}

impl Settings {
    /// `full` in a full run, `quick` with `--quick`.
    pub fn pick(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

/// The suite's state: settings and the rows measured so far.
pub struct Bench {
    /// Settings.
    pub settings: Settings,
    /// Rows, in the order measured.
    pub rows: Vec<Row>,
}

impl Bench {
    /// Run `cases` `settings.reps` times, round-robin, and record their rows.
    pub fn run_cases(&mut self, section: Section, mut cases: Vec<Case<'_>>) {
        if let Some(only) = &self.settings.only {
            let wanted: Vec<&str> = only.split(',').filter(|w| !w.is_empty()).collect();
            cases.retain(|c| {
                c.specs
                    .iter()
                    .any(|s| wanted.iter().any(|w| s.key.contains(w)))
            });
        }
        let mut first_row = Vec::with_capacity(cases.len());
        for c in &cases {
            first_row.push(self.rows.len());
            for s in &c.specs {
                self.rows.push(Row {
                    section,
                    key: s.key.clone(),
                    label: s.label.clone(),
                    kind: s.kind,
                    floor: s.floor.clone(),
                    peer: s.peer.clone(),
                    reps: Vec::new(),
                    error: None,
                });
            }
        }
        for rep in 0..self.settings.reps {
            for (c, &first) in cases.iter_mut().zip(&first_row) {
                let rows = &mut self.rows[first..first + c.specs.len()];
                if rows[0].error.is_some() {
                    continue;
                }
                let t = Instant::now();
                let result = (c.run)().and_then(|m| {
                    if m.len() == rows.len() {
                        Ok(m)
                    } else {
                        Err(format!("{} measurements for {} rows", m.len(), rows.len()))
                    }
                });
                match result {
                    Ok(ms) => {
                        for (row, m) in rows.iter_mut().zip(ms) {
                            row.reps.push(summarize(m));
                        }
                    }
                    Err(e) => {
                        eprintln!("bench: {}: {e}", rows[0].key);
                        for row in rows.iter_mut() {
                            row.error = Some(e.clone());
                        }
                    }
                }
                eprintln!(
                    "bench: {} rep {}/{} ({:.2} s)",
                    rows[0].key,
                    rep + 1,
                    self.settings.reps,
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
}

fn summarize(m: Measured) -> Rep {
    match m {
        Measured::Latency(mut samples) => {
            let (median, p99) = stats::median_p99(&mut samples);
            Rep {
                value: median,
                p99: Some(p99),
                count: samples.len() as u64,
            }
        }
        Measured::Rate { ops, secs } => Rep {
            value: ops as f64 / secs,
            p99: None,
            count: ops,
        },
        Measured::Value(v) => Rep {
            value: v,
            p99: None,
            count: 1,
        },
    }
}

/// Floors: eventfd and spin ping-pong, AF_UNIX request/reply of the control path's sizes.
fn floors(bench: &mut Bench) {
    let place = bench.settings.placement;
    let n = bench.settings.pick(20_000, 5_000);
    let spin_n = bench.settings.pick(200_000, 50_000);
    let unix = |(req, rep): (usize, usize)| {
        move || floors::unix_request_reply(&place, n, req, rep).map(Measured::Latency)
    };
    let cases = vec![
        Case::new(
            RowSpec::new(
                "floor.eventfd",
                "eventfd ping-pong (blocking read/write, two threads)",
                Kind::Latency,
            ),
            move || floors::eventfd_ping_pong(&place, n).map(Measured::Latency),
        ),
        Case::new(
            RowSpec::new(
                "floor.spin",
                "shared-memory spin ping-pong (one cache line)",
                Kind::Latency,
            ),
            move || floors::spin_ping_pong(&place, spin_n).map(Measured::Latency),
        ),
        Case::new(
            RowSpec::new(
                "floor.unix.read",
                format!(
                    "AF_UNIX request/reply, {}/{} bytes (REGION_READ sizes)",
                    control::READ_SIZES.0,
                    control::READ_SIZES.1
                ),
                Kind::Latency,
            ),
            unix(control::READ_SIZES),
        ),
        Case::new(
            RowSpec::new(
                "floor.unix.write",
                format!(
                    "AF_UNIX request/reply, {}/{} bytes (REGION_WRITE sizes)",
                    control::WRITE_SIZES.0,
                    control::WRITE_SIZES.1
                ),
                Kind::Latency,
            ),
            unix(control::WRITE_SIZES),
        ),
    ];
    bench.run_cases(Section::Floors, cases);
}

/// Control path: {unidev, rust-vmm} client × {unidev, rust-vmm} server × {read, write}.
fn control_path(bench: &mut Bench) {
    use control::{Access, ClientKind, ServerKind};
    let place = bench.settings.placement;
    let dir = bench.settings.work_dir.clone();
    let n = bench.settings.pick(20_000, 4_000);
    let name = |k: ServerKind| match k {
        ServerKind::Unidev => "unidev",
        ServerKind::RustVmm => "rust-vmm",
    };
    let client_name = |k: ClientKind| match k {
        ClientKind::Unidev => "unidev",
        ClientKind::RustVmm => "rust-vmm",
    };
    let mut cases = Vec::new();
    for access in [Access::Read, Access::Write] {
        let op = match access {
            Access::Read => "read",
            Access::Write => "write",
        };
        for client in [ClientKind::Unidev, ClientKind::RustVmm] {
            for server in [ServerKind::Unidev, ServerKind::RustVmm] {
                let key = format!(
                    "control.{op}.{}-client.{}-server",
                    client_name(client),
                    name(server)
                );
                let mut spec = RowSpec::new(
                    key,
                    format!(
                        "REGION_{} 4 B: {} client → {} server",
                        op.to_uppercase(),
                        client_name(client),
                        name(server)
                    ),
                    Kind::Latency,
                )
                .floor(format!("floor.unix.{op}"));
                if server == ServerKind::Unidev {
                    spec = spec.peer(format!(
                        "control.{op}.{}-client.rust-vmm-server",
                        client_name(client)
                    ));
                }
                let dir = dir.clone();
                let case = Case::new(spec, move || {
                    control::round_trips(&place, &dir, server, client, access, n)
                        .map(Measured::Latency)
                });
                cases.push(case);
            }
        }
    }
    bench.run_cases(Section::Control, cases);
}

/// Data path: every backend × transport × mode, QD1 latency and QD32 IOPS.
fn data_path(bench: &mut Bench) {
    use datapath::{Backend, Config, Mode, Transport};
    let place = bench.settings.placement;
    let dir = bench.settings.work_dir.clone();
    let qd1 = bench.settings.pick(10_000, 1_500);
    let deep = bench.settings.pick(100_000, 20_000);
    let mut cases = Vec::new();
    for backend in [Backend::Null, Backend::Tmpfs] {
        for mode in [Mode::Blocking, Mode::Adaptive] {
            for transport in Transport::ALL {
                let cfg = Config {
                    backend,
                    transport,
                    mode,
                };
                let key = cfg.key();
                let label = format!(
                    "{}, {} backend, {}",
                    transport.label(),
                    backend.key(),
                    mode.key()
                );
                let peer = match transport {
                    Transport::StockVhostUser => None,
                    Transport::UnidevVhostUser => Some(Config {
                        transport: Transport::StockVhostUser,
                        ..cfg
                    }),
                    Transport::VfioUserSocket | Transport::VfioUserMmap => Some(Config {
                        transport: Transport::UnidevVhostUser,
                        ..cfg
                    }),
                };
                let mut lat =
                    RowSpec::new(format!("{key}.qd1"), format!("{label}: QD1"), Kind::Latency)
                        .floor(match mode {
                            Mode::Blocking => "floor.eventfd",
                            Mode::Adaptive => "floor.spin",
                        });
                let mut iops =
                    RowSpec::new(format!("{key}.qd32"), format!("{label}: QD32"), Kind::Rate);
                if let Some(p) = peer {
                    lat = lat.peer(format!("{}.qd1", p.key()));
                    iops = iops.peer(format!("{}.qd32", p.key()));
                }
                let dir = dir.clone();
                cases.push(Case::multi(vec![lat, iops], move || {
                    let r = datapath::run(cfg, &place, &dir, qd1, deep)?;
                    Ok(vec![
                        Measured::Latency(r.qd1),
                        Measured::Rate {
                            ops: r.qd32.0,
                            secs: r.qd32.1,
                        },
                    ])
                }));
            }
        }
    }
    bench.run_cases(Section::Data, cases);
}

/// Memory layer: map+unmap rates and translation at 1, 1,000 and 65,535 maps.
fn memory_layer(bench: &mut Bench) {
    let pairs = bench.settings.pick(20_000, 2_000);
    let lookups = bench.settings.pick(2_000_000, 1_000_000);
    let mut cases = Vec::new();
    for (with_fd, present, key, label) in [
        (
            true,
            0,
            "memory.map-unmap.fd",
            "DMA map + unmap, 4 KiB with memfd (empty space)",
        ),
        (
            false,
            0,
            "memory.map-unmap.no-fd",
            "DMA map + unmap, 4 KiB without fd (empty space)",
        ),
        (
            true,
            1000,
            "memory.map-unmap.fd.1000",
            "DMA map + unmap, 4 KiB with memfd, 1,000 maps present",
        ),
    ] {
        cases.push(Case::new(RowSpec::new(key, label, Kind::Rate), move || {
            let (ops, secs) = memory::map_unmap_rate(with_fd, present, pairs)?;
            Ok(Measured::Rate { ops, secs })
        }));
    }
    for maps in [1u64, 1000, 65535] {
        let snapshot = RowSpec::new(
            format!("memory.translate.{maps}"),
            format!("translate (snapshot, vm-memory lookup), {maps} maps"),
            Kind::Value { unit: "ns" },
        );
        let find = RowSpec::new(
            format!("memory.find.{maps}"),
            format!("translate (DmaSpace::find, locked table), {maps} maps"),
            Kind::Value { unit: "ns" },
        );
        let (snapshot, find) = if maps == 1 {
            (snapshot, find)
        } else {
            (
                snapshot.peer("memory.translate.1"),
                find.peer("memory.find.1"),
            )
        };
        cases.push(Case::multi(vec![snapshot, find], move || {
            let (snap_ns, find_ns) = memory::translation(maps, lookups)?;
            Ok(vec![Measured::Value(snap_ns), Measured::Value(find_ns)])
        }));
    }
    bench.run_cases(Section::Memory, cases);
}

/// Scale: 1 and 64 idle devices in one daemon.
fn scale_out(bench: &mut Bench) {
    const DEVICES: usize = 64;
    let place = bench.settings.placement;
    let dir = bench.settings.work_dir.clone();
    let specs = vec![
        RowSpec::new(
            "scale.accept-ms",
            format!("{DEVICES} devices: spawn until every socket accepts"),
            Kind::Value { unit: "ms" },
        )
        .peer("scale.accept-ms.1"),
        RowSpec::new(
            "scale.accept-ms.1",
            "1 device: spawn until its socket accepts",
            Kind::Value { unit: "ms" },
        ),
        RowSpec::new(
            "scale.rss-total",
            format!("{DEVICES} devices: daemon resident memory"),
            Kind::Value { unit: "KiB" },
        ),
        RowSpec::new(
            "scale.rss-total.1",
            "1 device: daemon resident memory",
            Kind::Value { unit: "KiB" },
        ),
        RowSpec::new(
            "scale.rss-per-device",
            format!(
                "resident memory per idle device ((RSS {DEVICES} − RSS 1) / {})",
                DEVICES - 1
            ),
            Kind::Value { unit: "KiB" },
        ),
        RowSpec::new(
            "scale.threads-total",
            format!("{DEVICES} devices: daemon threads"),
            Kind::Value { unit: "threads" },
        ),
        RowSpec::new(
            "scale.threads-per-device",
            format!(
                "threads per idle device ((threads {DEVICES} − threads 1) / {})",
                DEVICES - 1
            ),
            Kind::Value { unit: "threads" },
        ),
    ];
    let daemon = bench.settings.daemon.clone();
    let case = Case::multi(specs, move || {
        let daemon = daemon
            .as_deref()
            .ok_or("no unidev daemon to start (--daemon PATH)")?;
        let one = scale::footprint(&place, &dir, daemon, 1)?;
        let many = scale::footprint(&place, &dir, daemon, DEVICES)?;
        let per = |a: f64, b: f64| (a - b) / (DEVICES - 1) as f64;
        Ok(vec![
            Measured::Value(many.accept_ms),
            Measured::Value(one.accept_ms),
            Measured::Value(many.rss_kib),
            Measured::Value(one.rss_kib),
            Measured::Value(per(many.rss_kib, one.rss_kib)),
            Measured::Value(many.threads),
            Measured::Value(per(many.threads, one.threads)),
        ])
    });
    bench.run_cases(Section::Scale, vec![case]);
}

/// The `unidev` daemon the scale section starts: `--daemon PATH`, else `$UNIDEV_BIN`,
/// else the `unidev` beside this executable (cargo builds both binaries into one target
/// directory). Fails, naming the path it looked at and both ways to name another, when
/// there is no such file.
fn find_daemon(flag: Option<&Path>) -> Result<PathBuf, String> {
    let env = std::env::var_os(DAEMON_ENV).filter(|v| !v.is_empty());
    let (path, from) = match (flag, env) {
        (Some(p), _) => (p.to_path_buf(), "from --daemon".to_string()),
        (None, Some(p)) => (PathBuf::from(p), format!("from {DAEMON_ENV}")),
        (None, None) => {
            let exe = std::env::current_exe().map_err(|e| {
                format!(
                    "cannot locate this executable to find the unidev daemon beside it ({e}); \
                     name the daemon with --daemon PATH or {DAEMON_ENV}=PATH"
                )
            })?;
            (
                exe.with_file_name("unidev"),
                "beside this executable".to_string(),
            )
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the scale section starts the unidev daemon, and there is none at {} ({from}): \
             build it (cargo build --release -p unidev) or name it with --daemon PATH or \
             {DAEMON_ENV}=PATH",
            path.display()
        ))
    }
}

/// `unidev-bench`.
pub fn run(args: BenchArgs) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_none() {
        // The servers log every connection at info; keep the run's output readable.
        log::set_max_level(log::LevelFilter::Warn);
    }
    let sections: Vec<Section> = if args.sections.is_empty() {
        Section::ALL.to_vec()
    } else {
        Section::ALL
            .into_iter()
            .filter(|s| args.sections.contains(s))
            .collect()
    };
    let daemon = if sections.contains(&Section::Scale) {
        Some(find_daemon(args.daemon.as_deref())?)
    } else {
        None
    };
    let placement = Placement::detect().map_err(|e| format!("cannot read CPU affinity: {e}"))?;
    let scratch_root = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let work_dir = scratch_root.join(format!("unidev-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)
        .map_err(|e| format!("cannot create {}: {e}", work_dir.display()))?;
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let mut bench = Bench {
        settings: Settings {
            quick: args.quick,
            reps: if args.quick { 1 } else { 5 },
            placement,
            work_dir: work_dir.clone(),
            only: args.only.clone(),
            daemon,
        },
        rows: Vec::new(),
    };
    let started = Instant::now();
    let load_before = report::load_average();
    placement
        .on_driver()
        .map_err(|e| format!("cannot pin to CPU {}: {e}", placement.driver_cpu))?;
    for s in &sections {
        eprintln!("bench: == {}", s.title());
        match s {
            Section::Floors => floors(&mut bench),
            Section::Control => control_path(&mut bench),
            Section::Data => data_path(&mut bench),
            Section::Memory => memory_layer(&mut bench),
            Section::Scale => scale_out(&mut bench),
        }
    }
    let _ = std::fs::remove_dir_all(&work_dir);
    let run = report::RunInfo {
        quick: args.quick,
        reps: bench.settings.reps,
        placement: placement.describe(),
        seconds: started.elapsed().as_secs_f64(),
        load_before,
        load_after: report::load_average(),
        sections,
    };
    let written = report::write(&args.out, &bench.rows, &run)?;
    println!("{written}");
    let failed = bench.rows.iter().filter(|r| r.error.is_some()).count();
    if failed > 0 {
        return Err(format!(
            "{failed} row(s) failed (listed at the end of {})",
            args.out.join("bench.md").display()
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(BenchArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("unidev-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(kind: Kind, values: &[f64]) -> Row {
        Row {
            section: Section::Data,
            key: "k".into(),
            label: "l".into(),
            kind,
            floor: None,
            peer: None,
            reps: values
                .iter()
                .map(|&value| Rep {
                    value,
                    p99: None,
                    count: 1,
                })
                .collect(),
            error: None,
        }
    }

    #[test]
    fn cost_ratios_are_per_repetition_and_inverse_for_rates() {
        // The machine doubles its speed after the first repetition: per-repetition
        // ratios see a steady 2x, the ratio of medians would not.
        let slow = row(Kind::Latency, &[20.0, 10.0, 10.0]);
        let fast = row(Kind::Latency, &[10.0, 5.0, 5.0]);
        assert_eq!(slow.cost_ratio(&fast), Some(2.0));
        // Fewer operations per second cost more.
        let few = row(Kind::Rate, &[100.0]);
        let many = row(Kind::Rate, &[400.0]);
        assert_eq!(few.cost_ratio(&many), Some(4.0));
        // Different repetition counts: ratio of the medians.
        let one = row(Kind::Latency, &[30.0]);
        assert_eq!(one.cost_ratio(&fast), Some(6.0));
        assert_eq!(row(Kind::Latency, &[]).cost_ratio(&fast), None);
        assert_eq!(slow.value(), Some(10.0));
        assert_eq!(slow.spread(), Some(1.0));
    }
}
