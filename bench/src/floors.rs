//! The floors every round trip is compared with: what two threads on the benchmark's two
//! CPUs need to hand a token back and forth, with nothing of unidev in between.
//!
//! * eventfd ping-pong: a blocking `read`/`write` of two eventfds, the wake-up every
//!   blocking transport pays at least once per direction;
//! * shared-memory spin ping-pong: one cache line bounced between two spinning threads,
//!   the least a polling transport can cost;
//! * AF_UNIX request/reply: a blocking `write` of a request and `read` of a reply on a
//!   stream socket pair, with the byte counts of a vfio-user REGION_READ/REGION_WRITE.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::pin::Placement;

/// Nanoseconds since `t`.
pub fn ns_since(t: Instant) -> f64 {
    t.elapsed().as_nanos() as f64
}

fn err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Round trips of a token through two blocking eventfds, responder on the device CPU.
pub fn eventfd_ping_pong(place: &Placement, rounds: usize) -> Result<Vec<f64>, String> {
    let ping = Arc::new(EventFd::new(0).map_err(err("eventfd"))?);
    let pong = Arc::new(EventFd::new(0).map_err(err("eventfd"))?);
    let (p, q) = (ping.clone(), pong.clone());
    let responder = place
        .build_on_device(|| {
            std::thread::Builder::new()
                .name("floor-eventfd".into())
                .spawn(move || -> std::io::Result<()> {
                    loop {
                        // The driver writes u64::MAX - 1 to stop us: eventfd counters
                        // add up, so a value that large is never a plain ping.
                        if p.read()? >= u64::MAX / 2 {
                            return Ok(());
                        }
                        q.write(1)?;
                    }
                })
        })
        .map_err(err("pin"))?
        .map_err(err("spawn"))?;
    let mut samples = Vec::with_capacity(rounds);
    let mut result = Ok(());
    for _ in 0..rounds {
        let t = Instant::now();
        if let Err(e) = ping.write(1).and_then(|_| pong.read()) {
            result = Err(format!("eventfd ping-pong: {e}"));
            break;
        }
        samples.push(ns_since(t));
    }
    let _ = ping.write(u64::MAX - 1);
    let joined = responder
        .join()
        .map_err(|_| "eventfd responder panicked".to_string())?;
    result?;
    joined.map_err(err("eventfd responder"))?;
    Ok(samples)
}

/// One counter on its own cache line.
#[repr(align(128))]
struct Line(AtomicU64);

/// Round trips of a counter between two threads spinning on one cache line.
pub fn spin_ping_pong(place: &Placement, rounds: usize) -> Result<Vec<f64>, String> {
    const STOP: u64 = u64::MAX;
    // Sharing one CPU, a spinner only makes progress when it gives the CPU up.
    let shared = place.driver_cpu == place.device_cpu;
    let pause = move || {
        if shared {
            std::thread::yield_now()
        } else {
            std::hint::spin_loop()
        }
    };
    let line = Arc::new(Line(AtomicU64::new(0)));
    let l = line.clone();
    let responder = place
        .build_on_device(|| {
            std::thread::Builder::new()
                .name("floor-spin".into())
                .spawn(move || {
                    let mut expect = 1u64;
                    loop {
                        let v = l.0.load(Ordering::Acquire);
                        if v == STOP {
                            return;
                        }
                        if v == expect {
                            l.0.store(v + 1, Ordering::Release);
                            expect += 2;
                        } else {
                            pause();
                        }
                    }
                })
        })
        .map_err(err("pin"))?
        .map_err(err("spawn"))?;
    let mut samples = Vec::with_capacity(rounds);
    for i in 0..rounds as u64 {
        let t = Instant::now();
        line.0.store(2 * i + 1, Ordering::Release);
        while line.0.load(Ordering::Acquire) != 2 * i + 2 {
            pause();
        }
        samples.push(ns_since(t));
    }
    line.0.store(STOP, Ordering::Release);
    responder
        .join()
        .map_err(|_| "spin responder panicked".to_string())?;
    Ok(samples)
}

/// Round trips of `request` bytes out and `reply` bytes back over an AF_UNIX stream
/// socket pair (blocking read/write on both ends), responder on the device CPU.
pub fn unix_request_reply(
    place: &Placement,
    rounds: usize,
    request: usize,
    reply: usize,
) -> Result<Vec<f64>, String> {
    let (mut driver, mut device) = UnixStream::pair().map_err(err("socketpair"))?;
    let responder = place
        .build_on_device(|| {
            std::thread::Builder::new().name("floor-unix".into()).spawn(
                move || -> std::io::Result<()> {
                    let mut req = vec![0u8; request];
                    let rep = vec![0u8; reply];
                    loop {
                        match device.read_exact(&mut req) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                                return Ok(())
                            }
                            Err(e) => return Err(e),
                        }
                        device.write_all(&rep)?;
                    }
                },
            )
        })
        .map_err(err("pin"))?
        .map_err(err("spawn"))?;
    let req = vec![0u8; request];
    let mut rep = vec![0u8; reply];
    let mut samples = Vec::with_capacity(rounds);
    let mut result = Ok(());
    for _ in 0..rounds {
        let t = Instant::now();
        if let Err(e) = driver
            .write_all(&req)
            .and_then(|_| driver.read_exact(&mut rep))
        {
            result = Err(format!("AF_UNIX request/reply: {e}"));
            break;
        }
        samples.push(ns_since(t));
    }
    drop(driver);
    let joined = responder
        .join()
        .map_err(|_| "AF_UNIX responder panicked".to_string())?;
    result?;
    joined.map_err(err("AF_UNIX responder"))?;
    Ok(samples)
}
