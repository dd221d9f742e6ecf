//! Scale: many idle devices in one daemon. `unidev run` (the `unidev` binary that
//! [`find_daemon`](super::find_daemon) found) is started with a devices file of N
//! virtio-blk devices over vfio-user, pinned to the device CPU; the run measures the time
//! from spawn until every socket accepts a connection, then (the connections closed, the
//! daemon idle) its resident memory and thread count from /proc. Per-device costs are the
//! difference between 64 devices and 1, over 63.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pin::Placement;

/// What one daemon measured.
pub struct DaemonFootprint {
    /// Spawn until every socket accepted, ms.
    pub accept_ms: f64,
    /// VmRSS, KiB.
    pub rss_kib: f64,
    /// Threads.
    pub threads: f64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_field(pid: u32, field: &str) -> Result<f64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status"))
}

/// Start `daemon` (the `unidev` binary) with `devices` idle virtio-blk devices and
/// measure it.
pub fn footprint(
    place: &Placement,
    dir: &Path,
    daemon: &Path,
    devices: usize,
) -> Result<DaemonFootprint, String> {
    let image = dir.join("scale.img");
    if !image.exists() {
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(1 << 20))
            .map_err(|e| format!("{}: {e}", image.display()))?;
    }
    let sockets: Vec<_> = (0..devices)
        .map(|i| dir.join(format!("scale-{devices}-{i}.sock")))
        .collect();
    let mut toml = String::new();
    for (i, s) in sockets.iter().enumerate() {
        toml.push_str(&format!(
            "[[device]]\nname = \"disk{i}\"\ntype = \"virtio-blk\"\ntransport = \"vfio-user\"\n\
             socket = \"{}\"\nfile = \"{}\"\n\n",
            s.display(),
            image.display()
        ));
    }
    let config = dir.join(format!("scale-{devices}.toml"));
    std::fs::write(&config, toml).map_err(|e| format!("{}: {e}", config.display()))?;
    // The daemon, copied once: the file may be rebuilt (and replaced) while a long run
    // goes on, and every repetition must measure the same binary.
    let exe = dir.join("unidev-under-test");
    if !exe.exists() {
        std::fs::copy(daemon, &exe).map_err(|e| {
            format!(
                "cannot copy the daemon {} to {}: {e}",
                daemon.display(),
                exe.display()
            )
        })?;
    }
    let started = Instant::now();
    let child = place
        .build_on_device(|| {
            Command::new(&exe)
                .arg("run")
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        })
        .map_err(|e| format!("pin: {e}"))?
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let daemon = Killed(child);
    let pid = daemon.0.id();
    let mut waiting: Vec<&Path> = sockets.iter().map(|p| p.as_path()).collect();
    let deadline = started + Duration::from_secs(30);
    while !waiting.is_empty() {
        waiting.retain(|s| std::os::unix::net::UnixStream::connect(s).is_err());
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {devices} sockets still not accepting after 30 s",
                waiting.len()
            ));
        }
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let accept_ms = started.elapsed().as_secs_f64() * 1e3;
    // Let the daemon see the hang-ups and go idle.
    std::thread::sleep(Duration::from_millis(300));
    let rss_kib = status_field(pid, "VmRSS:")?;
    let threads = status_field(pid, "Threads:")?;
    drop(daemon);
    for s in &sockets {
        let _ = std::fs::remove_file(s);
    }
    Ok(DaemonFootprint {
        accept_ms,
        rss_kib,
        threads,
    })
}
