//! A crash-recovery log of in-flight requests for split virtqueues, kept in shared memory
//! that outlives the daemon.
//!
//! **Experimental**: used by the vhost-user transport; a device never needs it (logging
//! is automatic for every `LocalVirtio`), and it may change in any 0.y release.
//!
//! The layout is the one vhost-user.rst defines under "Inflight I/O tracking" (the
//! `INFLIGHT_SHMFD` protocol feature): per queue, a 16-byte header (`features`, `version`,
//! `desc_num`, `last_batch_head`, `used_idx`) followed by one 16-byte `DescStateSplit`
//! (`inflight`, padding, `next`, `counter`) per descriptor, each queue's area rounded up to
//! 64 bytes. The frontend only stores the region and hands it back after a reconnect, so
//! the format is what backends agree on; using the spec's keeps a region readable by any
//! backend. The region is plain shared memory — nothing here knows a wire protocol; a
//! transport just moves its fd.
//!
//! # How requests are tracked without the backend's help
//!
//! Backends written against `VhostUserBackend` pop and complete descriptor chains on the
//! `virtio_queue::Queue` themselves; the dispatch cannot see individual pops. It records
//! at the edges of every `handle_event` call instead ([`InflightQueue`]):
//!
//! - before the call, every head the driver has made available is marked in flight
//!   (*pre-marked*), so a request the backend pops during the call is already logged;
//! - after the call, heads the backend popped beyond the pre-marked range (the driver
//!   published more meanwhile) are marked, and every head the backend put in the used ring
//!   is cleared, then `used_idx` is advanced.
//!
//! After a restart, [`InflightQueue::recover`] first clears the heads the used ring shows
//! completed since the last recorded `used_idx` (a crash between the used-ring write and
//! the log update), then resumes the ring at the used index: the in-flight heads must be
//! exactly the next available entries, which the backend then pops again. That holds for
//! every pre-marked request and for backends that complete in the order they pop (all
//! synchronous rust-vmm backends); a log whose in-flight heads are not the next available
//! entries (out-of-order completion) cannot be replayed to a backend that pops from the
//! ring itself, and recovery refuses it rather than lose or repeat a request.

use std::fs::File;
use std::io;
use std::num::Wrapping;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, VolatileMemory};

/// Bytes of the per-queue header.
const QUEUE_HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC_STATE: usize = 16;
/// Each queue's area starts on this boundary.
const QUEUE_ALIGN: usize = 64;
/// The `version` a backend writes into a queue area it has initialized.
const VERSION: u16 = 1;

// Offsets in the queue header.
const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_HEAD_AT: usize = 12;
const USED_IDX_AT: usize = 14;
// Offsets in a descriptor state.
const INFLIGHT_AT: usize = 0;
const NEXT_AT: usize = 6;
const COUNTER_AT: usize = 8;

/// Bytes of one queue's area for queues of `queue_size` descriptors.
pub fn queue_area_size(queue_size: u16) -> usize {
    let raw = QUEUE_HEADER + DESC_STATE * usize::from(queue_size);
    raw.div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// Why a region or a recovery was refused.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size is zero, or the area is smaller than they need.
    #[error("inflight region of {size} bytes cannot hold {num_queues} queues of {queue_size}")]
    BadGeometry {
        /// Bytes supplied.
        size: u64,
        /// Queues asked for.
        num_queues: u16,
        /// Descriptors per queue.
        queue_size: u16,
    },
    /// Mapping or creating the shared memory failed.
    #[error("inflight region: {}", crate::limits::describe(.0))]
    Io(#[from] io::Error),
    /// The ring is larger than the log's descriptor array.
    #[error("queue {index}: ring of {ring} descriptors does not fit a log of {logged}")]
    RingTooLarge {
        /// Queue.
        index: usize,
        /// Ring size.
        ring: u16,
        /// Descriptors the region tracks per queue.
        logged: u16,
    },
    /// The log cannot be replayed (see the module doc).
    #[error("queue {index}: cannot resume from the inflight log: {why}")]
    Unrecoverable {
        /// Queue.
        index: usize,
        /// What did not add up.
        why: String,
    },
    /// Guest memory holding the ring could not be read.
    #[error("queue {0}: ring memory is not accessible")]
    RingMemory(usize),
}

/// The shared-memory log of every queue of a device.
pub struct InflightRegion {
    map: MmapRegion<()>,
    num_queues: u16,
    queue_size: u16,
}

impl std::fmt::Debug for InflightRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightRegion")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightRegion {
    /// Bytes of a region for `num_queues` queues of `queue_size` descriptors.
    pub fn size_for(num_queues: u16, queue_size: u16) -> u64 {
        u64::from(num_queues) * queue_area_size(queue_size) as u64
    }

    /// A fresh, zeroed region in a new memfd; returns it and the fd to hand out.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Self, File), InflightError> {
        let size = Self::size_for(num_queues, queue_size);
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::BadGeometry {
                size,
                num_queues,
                queue_size,
            });
        }
        // SAFETY: memfd_create with a NUL-terminated name and valid flags; the result is
        // checked before use.
        let raw = unsafe {
            libc::memfd_create(
                c"unidev-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `raw` is a new descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(raw) };
        file.set_len(size)?;
        // The log must never shrink under a mapping (SIGBUS); growing is harmless.
        // SAFETY: fcntl on a valid memfd with a valid seal set; failure is checked.
        let sealed = unsafe {
            libc::fcntl(
                raw,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        if sealed < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let region = Self::map(file.try_clone()?, 0, size, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Map a region the frontend kept (`size` bytes of `file` from `offset`).
    pub fn map(
        file: File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let bad = InflightError::BadGeometry {
            size,
            num_queues,
            queue_size,
        };
        if num_queues == 0 || queue_size == 0 || size < Self::size_for(num_queues, queue_size) {
            return Err(bad);
        }
        // The file must really be that long: touching a page past its end would SIGBUS.
        let len = file.metadata()?.len();
        if offset.checked_add(size).is_none_or(|end| end > len) {
            return Err(bad);
        }
        let size = usize::try_from(size).map_err(|_| io::Error::other("region too large"))?;
        let map = MmapRegion::from_file(FileOffset::new(file, offset), size)
            .map_err(|e| io::Error::other(format!("cannot map the inflight region: {e}")))?;
        Ok(InflightRegion {
            map,
            num_queues,
            queue_size,
        })
    }

    /// Queues the region tracks.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors tracked per queue (the largest ring size it can log).
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn area(&self, queue: usize) -> Option<vm_memory::VolatileSlice<'_>> {
        if queue >= usize::from(self.num_queues) {
            return None;
        }
        let len = queue_area_size(self.queue_size);
        self.map.get_slice(queue * len, len).ok()
    }

    fn read_u16(&self, queue: usize, at: usize) -> u16 {
        self.area(queue)
            .and_then(|a| a.read_obj::<u16>(at).ok())
            .map(u16::from_le)
            .unwrap_or(0)
    }

    fn write_u16(&self, queue: usize, at: usize, v: u16) {
        if let Some(a) = self.area(queue) {
            let _ = a.write_obj(v.to_le(), at);
        }
    }

    fn desc_at(head: u16) -> usize {
        QUEUE_HEADER + DESC_STATE * usize::from(head)
    }

    fn is_inflight(&self, queue: usize, head: u16) -> bool {
        self.area(queue)
            .and_then(|a| a.read_obj::<u8>(Self::desc_at(head) + INFLIGHT_AT).ok())
            .is_some_and(|v| v == 1)
    }

    fn counter(&self, queue: usize, head: u16) -> u64 {
        self.area(queue)
            .and_then(|a| a.read_obj::<u64>(Self::desc_at(head) + COUNTER_AT).ok())
            .map(u64::from_le)
            .unwrap_or(0)
    }

    fn set_inflight(&self, queue: usize, head: u16, counter: u64) {
        if head >= self.queue_size {
            return;
        }
        if let Some(a) = self.area(queue) {
            let at = Self::desc_at(head);
            let _ = a.write_obj(counter.to_le(), at + COUNTER_AT);
            let _ = a.write_obj(1u8, at + INFLIGHT_AT);
        }
    }

    fn clear_inflight(&self, queue: usize, head: u16, batch_prev: u16) {
        if head >= self.queue_size {
            return;
        }
        if let Some(a) = self.area(queue) {
            let at = Self::desc_at(head);
            let _ = a.write_obj(batch_prev.to_le(), at + NEXT_AT);
            let _ = a.write_obj(0u8, at + INFLIGHT_AT);
        }
    }

    /// Zero queue `queue`'s area and stamp it as initialized with `used_idx`.
    fn initialize(&self, queue: usize, used_idx: u16) {
        if let Some(a) = self.area(queue) {
            let len = a.len();
            let _ = a.write_slice(&vec![0u8; len], 0);
            let _ = a.write_obj(self.queue_size.to_le(), DESC_NUM_AT);
            let _ = a.write_obj(used_idx.to_le(), USED_IDX_AT);
            let _ = a.write_obj(VERSION.to_le(), VERSION_AT);
        }
    }
}

fn read_u16<M: GuestMemory>(mem: &M, addr: u64, index: usize) -> Result<u16, InflightError> {
    mem.read_obj::<u16>(GuestAddress(addr))
        .map(u16::from_le)
        .map_err(|_| InflightError::RingMemory(index))
}

/// Where a started split ring lives, for reading its rings.
#[derive(Clone, Copy, Debug)]
pub struct RingLayout {
    /// Descriptors in the ring.
    pub size: u16,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
}

impl RingLayout {
    fn avail_idx<M: GuestMemory>(&self, mem: &M, q: usize) -> Result<u16, InflightError> {
        read_u16(mem, self.avail + 2, q)
    }

    fn avail_entry<M: GuestMemory>(
        &self,
        mem: &M,
        pos: u16,
        q: usize,
    ) -> Result<u16, InflightError> {
        let slot = u64::from(pos % self.size);
        read_u16(mem, self.avail + 4 + 2 * slot, q)
    }

    fn used_idx<M: GuestMemory>(&self, mem: &M, q: usize) -> Result<u16, InflightError> {
        read_u16(mem, self.used + 2, q)
    }

    /// The head of used element `pos` (its `id`, a u32 of which heads use 16 bits).
    fn used_head<M: GuestMemory>(&self, mem: &M, pos: u16, q: usize) -> Result<u16, InflightError> {
        let slot = u64::from(pos % self.size);
        mem.read_obj::<u32>(GuestAddress(self.used + 4 + 8 * slot))
            .map(|id| u32::from_le(id) as u16)
            .map_err(|_| InflightError::RingMemory(q))
    }
}

/// One running queue's view of the log, kept by the worker that runs the queue.
#[derive(Debug)]
pub struct InflightQueue {
    region: std::sync::Arc<InflightRegion>,
    index: usize,
    ring: RingLayout,
    /// Available entries below this position are logged.
    marked: Wrapping<u16>,
    /// Used entries below this position are logged as completed.
    logged_used: Wrapping<u16>,
    counter: u64,
}

/// Where a queue resumes after [`InflightQueue::recover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// Next available entry the backend pops.
    pub next_avail: u16,
    /// Next used entry the backend fills.
    pub next_used: u16,
    /// Requests found in flight that the backend will pop again.
    pub resubmitted: u16,
}

impl InflightQueue {
    /// Attach queue `index` of `region` to a ring about to start at `start` (the
    /// frontend's base). A queue area seen for the first time is initialized and the ring
    /// starts where the frontend says (`None`); one holding a log is recovered (see the
    /// module doc) and the returned point overrides the frontend's.
    pub fn recover<M: GuestMemory>(
        region: std::sync::Arc<InflightRegion>,
        index: usize,
        ring: RingLayout,
        start: u16,
        mem: &M,
    ) -> Result<(Self, Option<ResumePoint>), InflightError> {
        if usize::from(region.num_queues) <= index {
            return Err(InflightError::Unrecoverable {
                index,
                why: format!("the region tracks {} queues", region.num_queues),
            });
        }
        if ring.size == 0 || ring.size > region.queue_size {
            return Err(InflightError::RingTooLarge {
                index,
                ring: ring.size,
                logged: region.queue_size,
            });
        }
        let fresh = region.read_u16(index, VERSION_AT) != VERSION
            || region.read_u16(index, DESC_NUM_AT) != region.queue_size;
        let point = if fresh {
            region.initialize(index, start);
            None
        } else {
            Some(Self::replay(&region, index, ring, mem)?)
        };
        let (avail, used) = point.map_or((start, start), |p| (p.next_avail, p.next_used));
        let queue = InflightQueue {
            region,
            index,
            ring,
            marked: Wrapping(avail),
            logged_used: Wrapping(used),
            counter: 0,
        };
        Ok((queue, point))
    }

    fn replay<M: GuestMemory>(
        region: &InflightRegion,
        index: usize,
        ring: RingLayout,
        mem: &M,
    ) -> Result<ResumePoint, InflightError> {
        let unrecoverable = |why: String| InflightError::Unrecoverable { index, why };
        let used = ring.used_idx(mem, index)?;
        let logged = region.read_u16(index, USED_IDX_AT);
        let unlogged = used.wrapping_sub(logged);
        if unlogged > ring.size {
            return Err(unrecoverable(format!(
                "the used ring ran {unlogged} entries past the log (ring of {})",
                ring.size
            )));
        }
        // Completions the used ring shows but the log missed.
        for pos in 0..unlogged {
            let head = ring.used_head(mem, logged.wrapping_add(pos), index)?;
            region.clear_inflight(index, head, head);
        }
        region.write_u16(index, USED_IDX_AT, used);
        let mut inflight: Vec<(u64, u16)> = (0..ring.size)
            .filter(|h| region.is_inflight(index, *h))
            .map(|h| (region.counter(index, h), h))
            .collect();
        // Heads past the ring size are stale (a smaller ring than last time).
        for h in ring.size..region.queue_size {
            if region.is_inflight(index, h) {
                return Err(unrecoverable(format!("head {h} in flight beyond the ring")));
            }
        }
        inflight.sort_unstable();
        let n = inflight.len() as u16;
        let avail = ring.avail_idx(mem, index)?;
        if avail.wrapping_sub(used) < n {
            return Err(unrecoverable(format!(
                "{n} requests in flight but only {} available past the used index",
                avail.wrapping_sub(used)
            )));
        }
        let mut next: Vec<u16> = (0..n)
            .map(|i| ring.avail_entry(mem, used.wrapping_add(i), index))
            .collect::<Result<_, _>>()?;
        next.sort_unstable();
        let mut heads: Vec<u16> = inflight.iter().map(|(_, h)| *h).collect();
        heads.sort_unstable();
        if next != heads {
            return Err(unrecoverable(format!(
                "requests {heads:?} are in flight, but the next available entries are {next:?} \
                 (completed out of order; a VhostUserBackend pops from the ring itself, so \
                 they cannot be resubmitted)"
            )));
        }
        // The backend pops them again from the ring; the pre-marking logs them anew.
        for h in &heads {
            region.clear_inflight(index, *h, *h);
        }
        Ok(ResumePoint {
            next_avail: used,
            next_used: used,
            resubmitted: n,
        })
    }

    /// Before the backend runs: log every head the driver has made available.
    pub fn premark<M: GuestMemory>(&mut self, mem: &M) {
        let Ok(avail) = self.ring.avail_idx(mem, self.index) else {
            return;
        };
        self.mark_up_to(mem, avail);
    }

    fn mark_up_to<M: GuestMemory>(&mut self, mem: &M, end: u16) {
        // A driver cannot have more than a ring's worth outstanding; a larger jump is a
        // broken ring the backend will refuse, not something to log.
        let pending = end.wrapping_sub(self.marked.0);
        if pending > self.ring.size {
            self.marked = Wrapping(end);
            return;
        }
        for _ in 0..pending {
            if let Ok(head) = self.ring.avail_entry(mem, self.marked.0, self.index) {
                self.counter += 1;
                self.region.set_inflight(self.index, head, self.counter);
            }
            self.marked += 1;
        }
    }

    /// After the backend ran: log heads it popped beyond the pre-marked range and clear
    /// the ones it completed (`next_avail`/`next_used` are the queue's positions now).
    pub fn record<M: GuestMemory>(&mut self, mem: &M, next_avail: u16, next_used: u16) {
        // Ahead of the pre-marked range by at most a ring (behind it wraps to more).
        let beyond = next_avail.wrapping_sub(self.marked.0);
        if beyond != 0 && beyond <= self.ring.size {
            self.mark_up_to(mem, next_avail);
        }
        let done = next_used.wrapping_sub(self.logged_used.0);
        if done == 0 {
            return;
        }
        if done > self.ring.size {
            // Cannot have happened with a well-behaved backend; resynchronize.
            self.logged_used = Wrapping(next_used);
            self.region.write_u16(self.index, USED_IDX_AT, next_used);
            return;
        }
        let mut batch_prev = self.region.read_u16(self.index, LAST_BATCH_HEAD_AT);
        for _ in 0..done {
            if let Ok(head) = self.ring.used_head(mem, self.logged_used.0, self.index) {
                self.region.clear_inflight(self.index, head, batch_prev);
                batch_prev = head;
            }
            self.logged_used += 1;
        }
        self.region
            .write_u16(self.index, LAST_BATCH_HEAD_AT, batch_prev);
        self.region
            .write_u16(self.index, USED_IDX_AT, self.logged_used.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vm_memory::GuestMemoryMmap;

    const SIZE: u16 = 8;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    fn layout() -> RingLayout {
        RingLayout {
            size: SIZE,
            avail: AVAIL,
            used: USED,
        }
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap()
    }

    /// The driver makes `heads` available.
    fn publish(mem: &GuestMemoryMmap<()>, heads: &[u16]) {
        let mut idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        for h in heads {
            let slot = u64::from(idx % SIZE);
            mem.write_obj(*h, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// The backend completes `heads`.
    fn complete(mem: &GuestMemoryMmap<()>, heads: &[u16]) -> u16 {
        let mut idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        for h in heads {
            let slot = u64::from(idx % SIZE);
            mem.write_obj(u32::from(*h), GuestAddress(USED + 4 + 8 * slot))
                .unwrap();
            idx = idx.wrapping_add(1);
        }
        mem.write_obj(idx, GuestAddress(USED + 2)).unwrap();
        idx
    }

    fn region() -> Arc<InflightRegion> {
        Arc::new(InflightRegion::create(2, SIZE).unwrap().0)
    }

    #[test]
    fn geometry_follows_the_spec_layout() {
        // 16-byte header + 16 bytes per descriptor, each queue 64-byte aligned.
        assert_eq!(queue_area_size(8), 192);
        assert_eq!(queue_area_size(128), 2112);
        assert_eq!(queue_area_size(1), 64);
        assert_eq!(InflightRegion::size_for(2, 256), 2 * 4160);
        assert!(InflightRegion::create(0, 8).is_err());
        let (_, f) = InflightRegion::create(1, 8).unwrap();
        assert!(InflightRegion::map(f, 0, 100, 1, 8).is_err(), "too small");
        let (_, f) = InflightRegion::create(1, 8).unwrap();
        assert!(
            InflightRegion::map(f, 64, 192, 1, 8).is_err(),
            "past the file end"
        );
    }

    #[test]
    fn a_fresh_area_starts_where_the_frontend_says() {
        let mem = mem();
        let r = region();
        let (_, p) = InflightQueue::recover(r.clone(), 1, layout(), 5, &mem).unwrap();
        assert_eq!(p, None);
        assert_eq!(r.read_u16(1, VERSION_AT), VERSION);
        assert_eq!(r.read_u16(1, DESC_NUM_AT), SIZE);
    }

    #[test]
    fn a_ring_larger_than_the_log_is_refused() {
        let mem = mem();
        let ring = RingLayout {
            size: 16,
            ..layout()
        };
        assert!(matches!(
            InflightQueue::recover(region(), 0, ring, 0, &mem),
            Err(InflightError::RingTooLarge { .. })
        ));
    }

    #[test]
    fn in_order_requests_in_flight_are_popped_again_after_a_restart() {
        let mem = mem();
        let r = region();
        let (mut q, _) = InflightQueue::recover(r.clone(), 0, layout(), 0, &mem).unwrap();
        publish(&mem, &[3, 1, 4, 5]);
        q.premark(&mem);
        // The backend pops all four and completes the first two, then the daemon dies.
        let used = complete(&mem, &[3, 1]);
        q.record(&mem, 4, used);
        drop(q);
        let (_, p) = InflightQueue::recover(r.clone(), 0, layout(), 0, &mem).unwrap();
        assert_eq!(
            p,
            Some(ResumePoint {
                next_avail: 2,
                next_used: 2,
                resubmitted: 2
            }),
            "4 and 5 are popped again from positions 2 and 3"
        );
    }

    #[test]
    fn completions_the_log_missed_are_taken_from_the_used_ring() {
        let mem = mem();
        let r = region();
        let (mut q, _) = InflightQueue::recover(r.clone(), 0, layout(), 0, &mem).unwrap();
        publish(&mem, &[0, 1, 2]);
        q.premark(&mem);
        // Completed in the ring, then killed before the log was updated.
        complete(&mem, &[0, 1]);
        drop(q);
        let (_, p) = InflightQueue::recover(r, 0, layout(), 0, &mem).unwrap();
        assert_eq!(
            p,
            Some(ResumePoint {
                next_avail: 2,
                next_used: 2,
                resubmitted: 1
            })
        );
    }

    #[test]
    fn heads_popped_beyond_the_premark_are_logged_after_the_call() {
        let mem = mem();
        let r = region();
        let (mut q, _) = InflightQueue::recover(r.clone(), 0, layout(), 0, &mem).unwrap();
        publish(&mem, &[6]);
        q.premark(&mem);
        publish(&mem, &[7]); // arrives while the backend runs; it pops both
        q.record(&mem, 2, 0);
        assert!(r.is_inflight(0, 6) && r.is_inflight(0, 7));
        let used = complete(&mem, &[6, 7]);
        q.record(&mem, 2, used);
        assert!(!r.is_inflight(0, 6) && !r.is_inflight(0, 7));
        assert_eq!(r.read_u16(0, USED_IDX_AT), 2);
        assert_eq!(r.read_u16(0, LAST_BATCH_HEAD_AT), 7);
        let (_, p) = InflightQueue::recover(r, 0, layout(), 9, &mem).unwrap();
        assert_eq!(
            p,
            Some(ResumePoint {
                next_avail: 2,
                next_used: 2,
                resubmitted: 0
            })
        );
    }

    #[test]
    fn out_of_order_completion_is_refused_rather_than_lost() {
        let mem = mem();
        let r = region();
        let (mut q, _) = InflightQueue::recover(r.clone(), 0, layout(), 0, &mem).unwrap();
        publish(&mem, &[0, 1, 2]);
        q.premark(&mem);
        let used = complete(&mem, &[1]); // head 0 still in flight, 1 done, 2 in flight
        q.record(&mem, 3, used);
        let err = InflightQueue::recover(r, 0, layout(), 0, &mem).unwrap_err();
        assert!(matches!(err, InflightError::Unrecoverable { .. }), "{err}");
    }

    #[test]
    fn indices_wrap() {
        let mem = mem();
        let r = region();
        mem.write_obj(65534u16, GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(65534u16, GuestAddress(USED + 2)).unwrap();
        let (mut q, _) = InflightQueue::recover(r.clone(), 0, layout(), 65534, &mem).unwrap();
        publish(&mem, &[1, 2, 3]);
        q.premark(&mem);
        let used = complete(&mem, &[1, 2]);
        q.record(&mem, 1, used);
        let (_, p) = InflightQueue::recover(r, 0, layout(), 0, &mem).unwrap();
        assert_eq!(
            p,
            Some(ResumePoint {
                next_avail: 0,
                next_used: 0,
                resubmitted: 1
            })
        );
    }
}
