//! Where the benchmark's threads run: one CPU for the driver (client) side, another for
//! the device (server) side, the same for every row.
//!
//! Threads inherit their creator's affinity, so device-side objects are built while the
//! building thread is pinned to the device CPU ([`Placement::on_device`]): the server
//! loop, the vring workers the core spawns, the stock daemon's threads all land there.
//! The measuring thread then moves to the driver CPU.

use std::io;

/// The two CPUs every row uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// CPU of the driver / client thread (the one that times requests).
    pub driver_cpu: usize,
    /// CPU of every device-side thread (server loop, vring workers, daemons).
    pub device_cpu: usize,
}

impl Placement {
    /// The first two CPUs this process may run on (one CPU: both sides share it).
    pub fn detect() -> io::Result<Placement> {
        let allowed = allowed_cpus()?;
        let driver_cpu = *allowed
            .first()
            .ok_or_else(|| io::Error::other("no CPU in the affinity mask"))?;
        let device_cpu = allowed.get(1).copied().unwrap_or(driver_cpu);
        Ok(Placement {
            driver_cpu,
            device_cpu,
        })
    }

    /// Pin the calling thread to the device CPU (threads it creates inherit that).
    pub fn on_device(&self) -> io::Result<()> {
        pin_current_thread(self.device_cpu)
    }

    /// Pin the calling thread to the driver CPU.
    pub fn on_driver(&self) -> io::Result<()> {
        pin_current_thread(self.driver_cpu)
    }

    /// Run `build` on the device CPU, then come back to the driver CPU.
    pub fn build_on_device<T>(&self, build: impl FnOnce() -> T) -> io::Result<T> {
        self.on_device()?;
        let built = build();
        self.on_driver()?;
        Ok(built)
    }

    /// How the placement reads in the report.
    pub fn describe(&self) -> String {
        if self.driver_cpu == self.device_cpu {
            format!(
                "driver and device threads share CPU {} (only one CPU allowed)",
                self.driver_cpu
            )
        } else {
            format!(
                "driver/client thread pinned to CPU {}; every device-side thread (server loop, \
                 vring workers, stock daemon threads, floor responders) pinned to CPU {} \
                 (sched_setaffinity, inherited by the threads they create)",
                self.driver_cpu, self.device_cpu
            )
        }
    }
}

/// CPUs in this process's affinity mask, ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is a valid, writable cpu_set_t of the
    // size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET only reads `set`, for CPU numbers below its capacity.
    Ok((0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pin the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes one bit of `set`; `cpu` comes from the affinity mask, below
    // the set's capacity (CPU_SET ignores larger numbers anyway).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
