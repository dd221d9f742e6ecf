//! Virtqueue chains against each backend (virtio-blk on a small image, virtio-rng) with
//! adversarial guest memory: the fuzzer writes the descriptor table, the available ring
//! and the buffers; the backend's `handle_event` runs on the split ring exactly as the
//! dispatch would run it, with or without EVENT_IDX. It must complete or reject each
//! chain, never panic, loop forever or touch memory outside the guest's.
//!
//! Input: byte 0: backend (bit 0), EVENT_IDX (bit 1), read-only image (bit 2), queue
//! size (bits 3-5: 2^n, n = 1..=8); u16 available index; then the first 64 KiB of guest
//! memory (descriptors at 0, available ring at 0x1000, used ring at 0x2000, buffers
//! anywhere below 1 MiB).
#![no_main]

use std::io::Write;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk};
use unidev_backends::virtio_rng::VirtioRng;
use unidev_fuzz::Input;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const MEM: usize = 1 << 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fn image() -> &'static std::path::PathBuf {
    static IMAGE: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("unidev-fuzz-blk-{}.img", std::process::id()));
        let mut f = std::fs::File::create(&path).expect("image");
        f.write_all(&vec![0x5a; 64 * 1024]).expect("image content");
        path
    })
}

fn run<B>(backend: &B, mem: &GuestMemoryAtomic<GuestMemoryMmap<()>>, size: u16, event_idx: bool)
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock>,
{
    backend.update_memory(mem.clone()).expect("update memory");
    backend.set_event_idx(event_idx);
    let vring = VringRwLock::new(mem.clone(), size).expect("vring");
    vring.set_queue_size(size);
    if vring.set_queue_info(DESC, AVAIL, USED).is_err() {
        return;
    }
    vring.set_queue_ready(true);
    vring.set_queue_event_idx(event_idx);
    vring.set_enabled(true);
    let vrings = [vring];
    // Twice: the second call sees whatever the first left (a half-consumed ring).
    for _ in 0..2 {
        let _ = backend.handle_event(0, EventSet::IN, &vrings, 0);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let avail_idx = input.u16();
    let size = 1u16 << (1 + (flags >> 3) % 8);
    let event_idx = flags & 2 != 0;
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let content = input.bytes(64 * 1024);
    gm.write_slice(content, GuestAddress(0)).expect("content");
    gm.write_obj(avail_idx, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    let mem = GuestMemoryAtomic::new(gm);
    if flags & 1 == 0 {
        let Ok(blk) = VirtioBlk::new(BlkOptions {
            path: image().clone(),
            readonly: flags & 4 != 0,
            ..BlkOptions::default()
        }) else {
            return;
        };
        run(&Arc::new(blk), &mem, size, event_idx);
    } else {
        let rng = VirtioRng::new().expect("rng");
        run(&Arc::new(rng), &mem, size, event_idx);
    }
});
