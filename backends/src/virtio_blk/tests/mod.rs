//! End-to-end tests of the virtio-blk backend on split virtqueues in guest memory,
//! driven as a driver would: the harness ([`Rig`], [`Image`]) and the tests, by subject.

mod device;
mod disk;
mod requests;

use std::io;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

const QSIZE: u16 = 64;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Guest memory: two adjacent 8 MiB regions.
const REGION: u64 = 8 << 20;
const MEM_END: u64 = 2 * REGION;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
const TABLE: u64 = 0x40_0000;
const IMAGE: usize = 1 << 20;
const R: bool = false;
const W: bool = true;

/// A split virtqueue in guest memory, driven as a driver would.
struct Rig {
    mem: Memory,
    vring: VringRwLock,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
    base: (u64, u64, u64),
}

impl Rig {
    fn new(b: &VirtioBlk, event_idx: bool) -> Rig {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), REGION as usize),
            (GuestAddress(REGION), REGION as usize),
        ])
        .unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        b.update_memory(mem.clone()).unwrap();
        b.set_event_idx(event_idx);
        Self::with_memory(mem, (DESC, AVAIL, USED), event_idx)
    }

    fn with_memory(mem: Memory, base: (u64, u64, u64), event_idx: bool) -> Rig {
        let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(base.0, base.1, base.2).unwrap();
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
            used_seen: 0,
            next_desc: 0,
            base,
        }
    }

    fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap<()>> {
        self.mem.memory()
    }

    fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let m = self.m();
        let d = GuestAddress(table + 16 * u64::from(i));
        m.write_obj(addr, d).unwrap();
        m.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        m.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
        m.write_obj(next, GuestAddress(d.0 + 14)).unwrap();
    }

    /// Lay out a chain of (addr, len, device-writable) in the descriptor table and
    /// publish it; returns its head.
    fn post(&mut self, chain: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < chain.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(self.base.0, idx, addr, len, flags, (idx + 1) % QSIZE);
        }
        self.next_desc = (head + chain.len() as u16) % QSIZE;
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let m = self.m();
        let slot = u64::from(self.avail_idx % QSIZE);
        m.write_obj(head, GuestAddress(self.base.1 + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(self.base.1 + 2))
            .unwrap();
    }

    fn kick(&self, b: &VirtioBlk) {
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.m().read_obj(GuestAddress(self.base.2 + 2)).unwrap()
    }

    /// Used entry `i`: (head, len).
    fn used(&self, i: u16) -> (u32, u32) {
        let at = self.base.2 + 4 + 8 * u64::from(i % QSIZE);
        let m = self.m();
        (
            m.read_obj(GuestAddress(at)).unwrap(),
            m.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    /// Post one chain, kick, and return the used length it got.
    fn run(&mut self, b: &VirtioBlk, chain: &[(u64, u32, bool)]) -> u32 {
        let head = self.post(chain);
        self.kick(b);
        assert_eq!(
            self.used_idx(),
            self.used_seen.wrapping_add(1),
            "one chain, one used entry"
        );
        let (id, len) = self.used(self.used_seen);
        assert_eq!(id, u32::from(head));
        self.used_seen = self.used_seen.wrapping_add(1);
        len
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        let m = self.m();
        m.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
    }

    /// A request: header at HDR, the given data descriptors, status at STATUS.
    /// Returns (status, used length).
    fn request(
        &mut self,
        b: &VirtioBlk,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
    ) -> (u8, u32) {
        self.header(HDR, kind, sector);
        self.m().write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, R)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, W));
        let len = self.run(b, &chain);
        (self.status(), len)
    }

    fn status(&self) -> u8 {
        self.m().read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn fill(&self, at: u64, bytes: &[u8]) {
        self.m().write_slice(bytes, GuestAddress(at)).unwrap();
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.m().read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn signalled(&self) -> bool {
        self.call.read().is_ok()
    }
}

struct Image(PathBuf);

impl Image {
    fn new(name: &str) -> Image {
        Self::in_dir(&std::env::temp_dir(), name)
    }

    fn in_dir(dir: &Path, name: &str) -> Image {
        let p = dir.join(format!("unidev-blk-{}-{name}.img", std::process::id()));
        std::fs::write(&p, vec![0x5au8; IMAGE]).unwrap();
        Image(p)
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }

    fn opts(&self) -> BlkOptions {
        BlkOptions {
            path: self.0.clone(),
            ..BlkOptions::default()
        }
    }

    fn open(&self, f: impl FnOnce(&mut BlkOptions)) -> VirtioBlk {
        let mut o = self.opts();
        f(&mut o);
        VirtioBlk::new(o).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(17).wrapping_add((i / 3) as u8))
        .collect()
}

/// (sector, num_sectors, flags)
type DwzSeg = (u64, u32, u32);

fn dwz(r: &Rig, at: u64, segs: &[DwzSeg]) -> u32 {
    for (i, &(sector, num, flags)) in segs.iter().enumerate() {
        let a = at + 16 * i as u64;
        r.m().write_obj(sector.to_le(), GuestAddress(a)).unwrap();
        r.m().write_obj(num.to_le(), GuestAddress(a + 8)).unwrap();
        r.m()
            .write_obj(flags.to_le(), GuestAddress(a + 12))
            .unwrap();
    }
    16 * segs.len() as u32
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
