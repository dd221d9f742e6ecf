//! virtio-rng (virtio 1.2 section 5.4): an entropy device fed from the OS random source.
//!
//! Written only against rust-vmm's `VhostUserBackend` trait (the `&self` flavour): it
//! runs unchanged over every unidev transport and in vhost-user-backend's own daemon.
//! One queue; every device-writable buffer of a request is filled straight from
//! getrandom(2) (or /dev/urandom where getrandom is missing), at most 64 KiB per request;
//! device-readable buffers are ignored. The used length is the number of bytes written.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use log::{debug, warn};
use unidev_core::sync;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Virtio device ID of an entropy device.
pub const VIRTIO_ID_RNG: u32 = unidev_core::virtio::spec::VIRTIO_ID_RNG;
/// Most bytes handed out per request.
const MAX_REQUEST: usize = 64 * 1024;
const QUEUE_SIZE: usize = 256;
/// Chains served before completing them and signalling the driver.
const BATCH: usize = 64;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

enum Source {
    GetRandom,
    Urandom(File),
}

/// The virtio-rng backend.
pub struct VirtioRng {
    source: Source,
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    exit: Mutex<Option<EventNotifier>>,
}

impl VirtioRng {
    /// A new entropy device.
    pub fn new() -> io::Result<Self> {
        let mut probe = [0u8; 1];
        // SAFETY: getrandom writes at most one byte into the valid buffer.
        let r = unsafe { libc::getrandom(probe.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
        let source = if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            Source::Urandom(File::open("/dev/urandom")?)
        } else {
            Source::GetRandom
        };
        Ok(VirtioRng {
            source,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            exit: Mutex::new(None),
        })
    }

    /// Wake the worker's exit event (the one handed out by `exit_event`).
    pub fn notify_exit(&self) {
        if let Some(n) = sync::lock(&self.exit).as_ref() {
            if let Err(e) = n.notify() {
                warn!("virtio-rng: cannot signal the exit event: {e}");
            }
        }
    }

    /// Fill `len` bytes at `ptr` with random bytes.
    ///
    /// # Safety
    /// `ptr..ptr + len` must be writable memory that stays mapped during the call.
    unsafe fn fill(&self, ptr: *mut u8, len: usize) -> io::Result<()> {
        let mut done = 0;
        while done < len {
            // SAFETY: the caller guarantees the range; each call writes at most the
            // remaining bytes after `done`.
            let n = unsafe {
                let p = ptr.add(done).cast();
                match &self.source {
                    Source::GetRandom => libc::getrandom(p, len - done, 0),
                    Source::Urandom(f) => libc::read(f.as_raw_fd(), p, len - done),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Serve one chain; returns the bytes written into it.
    fn serve(
        &self,
        m: &GuestMemoryMmap<()>,
        descs: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> u32 {
        let mut written = 0usize;
        for d in descs {
            if !d.is_write_only() || d.len() == 0 {
                continue;
            }
            let want = (d.len() as usize).min(MAX_REQUEST - written);
            if want == 0 {
                break;
            }
            if !GuestMemoryBackend::check_range(m, d.addr(), want) {
                debug!("virtio-rng: buffer outside guest memory");
                break;
            }
            for slice in GuestMemoryBackend::get_slices(m, d.addr(), want) {
                let Ok(slice) = slice else {
                    return written as u32;
                };
                // SAFETY: the slice is a bounds-checked range of guest memory, mapped
                // while `m` (the caller's snapshot) lives.
                if let Err(e) = unsafe { self.fill(slice.ptr_guard_mut().as_ptr(), slice.len()) } {
                    warn!("virtio-rng: the random source failed: {e}");
                    return written as u32;
                }
                written += slice.len();
            }
        }
        written as u32
    }

    /// Serve every available chain; returns whether there were any.
    fn drain(&self, vring: &VringRwLock, m: &GuestMemoryMmap<()>, event_idx: bool) -> bool {
        let mut any = false;
        let mut used = [(0u16, 0u32); BATCH];
        loop {
            let mut n = 0;
            while n < BATCH {
                let chain = {
                    let mut state = vring.get_mut();
                    if !state.is_enabled() {
                        break;
                    }
                    match state.get_queue_mut().pop_descriptor_chain(m) {
                        Some(c) => c,
                        None => break,
                    }
                };
                let head = chain.head_index();
                used[n] = (head, self.serve(m, chain));
                n += 1;
            }
            if n == 0 {
                return any;
            }
            any = true;
            let mut state = vring.get_mut();
            for &(head, len) in &used[..n] {
                if let Err(e) = state.get_queue_mut().add_used(m, head, len) {
                    debug!("virtio-rng: cannot complete chain {head}: {e}");
                }
            }
            let notify = !event_idx || state.get_queue_mut().needs_notification(m).unwrap_or(true);
            if notify {
                if let Err(e) = state.signal_used_queue() {
                    warn!("virtio-rng: cannot signal the driver: {e}");
                }
            }
        }
    }
}

impl VhostUserBackend for VirtioRng {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.event_idx.store(false, Ordering::Release);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *sync::write(&self.mem) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![1]
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => pair,
            Err(e) => {
                warn!("virtio-rng: cannot create an exit event: {e}");
                return None;
            }
        };
        if thread_index == 0 {
            *sync::lock(&self.exit) = notifier.try_clone().ok();
        }
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if !vring.get_ref().is_enabled() {
            return Ok(());
        }
        let Some(mem) = sync::read(&self.mem).clone() else {
            return Ok(());
        };
        let guard = mem.memory();
        let m: &GuestMemoryMmap<()> = &guard;
        if !self.event_idx.load(Ordering::Acquire) {
            self.drain(vring, m, false);
            return Ok(());
        }
        crate::vring_loop::drain_with_event_idx("virtio-rng", vring, || self.drain(vring, m, true));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::Arc;
    use std::time::Duration;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const QSIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const BUF: u64 = 0x10_0000;
    const MEM: usize = 4 << 20;

    struct Rig {
        mem: Memory,
        vring: VringRwLock,
        call: EventFd,
        avail_idx: u16,
        next_desc: u16,
    }

    impl Rig {
        fn new(rng: &VirtioRng, event_idx: bool) -> Rig {
            let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
            let mem = GuestMemoryAtomic::new(gm);
            rng.update_memory(mem.clone()).unwrap();
            rng.set_event_idx(event_idx);
            let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
            vring.set_queue_size(QSIZE);
            vring.set_queue_info(DESC, AVAIL, USED).unwrap();
            vring.set_queue_ready(true);
            vring.set_queue_event_idx(event_idx);
            vring.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: the File takes sole ownership of a fresh duplicate.
            let f = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
            vring.set_call(Some(f));
            Rig {
                mem,
                vring,
                call,
                avail_idx: 0,
                next_desc: 0,
            }
        }

        fn post(&mut self, chain: &[(u64, u32, bool)]) -> u16 {
            let m = self.mem.memory();
            let head = self.next_desc;
            for (i, &(addr, len, w)) in chain.iter().enumerate() {
                let idx = (head + i as u16) % QSIZE;
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < chain.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let d = DESC + 16 * u64::from(idx);
                m.write_obj(addr, GuestAddress(d)).unwrap();
                m.write_obj(len, GuestAddress(d + 8)).unwrap();
                m.write_obj(flags, GuestAddress(d + 12)).unwrap();
                m.write_obj((idx + 1) % QSIZE, GuestAddress(d + 14))
                    .unwrap();
            }
            self.next_desc = (head + chain.len() as u16) % QSIZE;
            let slot = u64::from(self.avail_idx % QSIZE);
            m.write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            head
        }

        fn kick(&self, rng: &VirtioRng) {
            rng.handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn used(&self, i: u16) -> (u32, u32) {
            let at = USED + 4 + 8 * u64::from(i % QSIZE);
            let m = self.mem.memory();
            (
                m.read_obj(GuestAddress(at)).unwrap(),
                m.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        fn read(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem
                .memory()
                .read_slice(&mut v, GuestAddress(at))
                .unwrap();
            v
        }
    }

    fn looks_random(b: &[u8]) -> bool {
        let distinct: std::collections::HashSet<u8> = b.iter().copied().collect();
        distinct.len() > 200
    }

    #[test]
    fn fills_writable_buffers_and_ignores_readable_ones() {
        for event_idx in [false, true] {
            let rng = VirtioRng::new().unwrap();
            let mut r = Rig::new(&rng, event_idx);
            let h1 = r.post(&[(BUF, 4096, true), (BUF + 0x2000, 64, false)]);
            let h2 = r.post(&[
                (BUF + 0x4000, 64, false),
                (BUF + 0x5000, 1000, true),
                (BUF + 0x6000, 3000, true),
            ]);
            r.kick(&rng);
            assert_eq!(r.used_idx(), 2);
            assert_eq!(r.used(0), (u32::from(h1), 4096));
            assert_eq!(r.used(1), (u32::from(h2), 4000));
            assert!(looks_random(&r.read(BUF, 4096)));
            assert!(looks_random(&r.read(BUF + 0x5000, 1000)));
            assert!(looks_random(&r.read(BUF + 0x6000, 3000)));
            assert_eq!(r.read(BUF + 0x2000, 64), vec![0; 64], "readable: untouched");
            assert_eq!(r.read(BUF + 0x4000, 64), vec![0; 64]);
            assert_ne!(r.read(BUF, 4096), r.read(BUF + 0x6000, 4096), "no repeats");
            assert_eq!(r.call.read().unwrap(), 1, "the driver was notified");
        }
    }

    #[test]
    fn a_request_gets_at_most_64_kib() {
        let rng = VirtioRng::new().unwrap();
        let mut r = Rig::new(&rng, false);
        r.post(&[(BUF, 100 << 10, true)]);
        r.post(&[
            (BUF + 0x4_0000, 40 << 10, true),
            (BUF + 0x8_0000, 40 << 10, true),
        ]);
        r.kick(&rng);
        assert_eq!(r.used(0).1, 64 << 10);
        assert_eq!(r.read(BUF + (64 << 10), 36 << 10), vec![0; 36 << 10]);
        assert_eq!(r.used(1).1, 64 << 10);
        assert!(looks_random(&r.read(BUF + 0x8_0000, 24 << 10)));
        assert_eq!(
            r.read(BUF + 0x8_0000 + (24 << 10), 16 << 10),
            vec![0; 16 << 10]
        );
    }

    #[test]
    fn bad_chains_never_panic() {
        let rng = VirtioRng::new().unwrap();
        let mut r = Rig::new(&rng, false);
        // Outside guest memory, straddling its end, after a good buffer.
        r.post(&[(1 << 40, 512, true)]);
        r.post(&[(MEM as u64 - 100, 512, true)]);
        r.post(&[(BUF, 512, true), (u64::MAX - 10, 512, true)]);
        r.kick(&rng);
        assert_eq!(r.used_idx(), 3);
        assert_eq!((r.used(0).1, r.used(1).1, r.used(2).1), (0, 0, 512));
        // A descriptor loop.
        let m = r.mem.memory();
        let d = DESC + 16 * u64::from(r.next_desc);
        m.write_obj(BUF, GuestAddress(d)).unwrap();
        m.write_obj(16u32, GuestAddress(d + 8)).unwrap();
        m.write_obj(
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            GuestAddress(d + 12),
        )
        .unwrap();
        m.write_obj(r.next_desc, GuestAddress(d + 14)).unwrap();
        drop(m);
        r.post(&[]); // publishes next_desc as the head
        r.kick(&rng);
        assert_eq!(r.used_idx(), 4);
        assert!(r.used(3).1 <= 16 * u32::from(QSIZE));
        // Still serving.
        r.post(&[(BUF, 256, true)]);
        r.kick(&rng);
        assert_eq!(r.used(4).1, 256);
    }

    #[test]
    fn a_broken_available_index_does_not_spin() {
        let rng = Arc::new(VirtioRng::new().unwrap());
        let r = Rig::new(&rng, true);
        r.mem
            .memory()
            .write_obj(500u16, GuestAddress(AVAIL + 2))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (rng2, vring) = (rng.clone(), r.vring.clone());
        std::thread::spawn(move || {
            rng2.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("handle_event returned");
    }

    #[test]
    fn features_and_lifecycle() {
        let rng = VirtioRng::new().unwrap();
        let f = rng.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
        ] {
            assert_ne!(f & (1 << bit), 0);
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert!(rng
            .protocol_features()
            .contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK));
        assert_eq!(rng.num_queues(), 1);
        assert_eq!(rng.queues_per_thread(), vec![1]);
        let (c, _n) = rng.exit_event(0).unwrap();
        assert!(c.consume().is_err());
        rng.notify_exit();
        assert!(c.consume().is_ok());
        rng.set_event_idx(true);
        rng.reset_device();
        assert!(!rng.event_idx.load(Ordering::Relaxed));
        // No memory yet: nothing to do, no panic.
        let vring = VringRwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 16).unwrap();
        rng.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
    }
}
