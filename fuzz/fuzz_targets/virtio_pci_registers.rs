//! The virtio-pci register file (virtio 1.2 section 4.1): config space, the MSI-X BAR and
//! the virtio BAR (common config, notify, ISR, device config) of a virtio-rng function,
//! accessed in any order, size and offset — including a driver that sets up queues over
//! fuzzer-made guest memory and kicks them, so a worker really runs the rings.
//!
//! Input: byte 0 picks adaptive polling, byte 1 the number of operations; then the
//! operations `[op u8][offset u16][value u64]`: op bits 0-1 select config space, BAR 1
//! (MSI-X), BAR 4 (virtio) or a reset; bit 2 write vs read; bits 3-4 the access size (1,
//! 2, 4, 8); the rest is guest memory content (mapped with an fd at IOVA 0x10000). Every
//! access must return an answer or an error, never panic.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use unidev_backends::virtio_rng::{VirtioRng, VIRTIO_ID_RNG};
use unidev_core::memory::{DmaSpace, FdBacking, MapRequest, Prot};
use unidev_core::pci::{PciDevice, PciRegion};
use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioPci, VirtioPciOptions};
use unidev_fuzz::{memfd, Input};

const GUEST_IOVA: u64 = 0x10000;
const GUEST_SIZE: u64 = 0x10000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let options = DispatchOptions {
        poll: if input.u8() & 1 == 1 {
            Duration::from_micros(50)
        } else {
            Duration::ZERO
        },
        busy: false,
    };
    let count = input.u8();
    let ops: Vec<(u8, u16, u64)> = (0..count)
        .map(|_| (input.u8(), input.u16(), input.u64()))
        .collect();
    let content = input.bytes(GUEST_SIZE as usize).to_vec();
    let dma = Arc::new(DmaSpace::default());
    dma.map(MapRequest {
        iova: GUEST_IOVA,
        size: GUEST_SIZE,
        prot: Prot::READ_WRITE,
        backing: Some(FdBacking {
            file: memfd(GUEST_SIZE, &content),
            offset: 0,
        }),
    })
    .expect("map");
    dma.publish();
    let rng = Arc::new(VirtioRng::new().expect("rng"));
    let local = LocalVirtio::new(VIRTIO_ID_RNG, rng, &dma, options).expect("local virtio");
    let mut pci =
        VirtioPci::new("fuzz", local, dma, VirtioPciOptions::default()).expect("virtio-pci");
    for (op, offset, value) in ops {
        let offset = u64::from(offset);
        let value = value.to_le_bytes();
        let size = 1usize << ((op >> 3) & 3);
        let region = match op & 3 {
            0 => PciRegion::Config,
            1 => PciRegion::Bar(1),
            2 => PciRegion::Bar(4),
            _ => {
                pci.reset();
                continue;
            }
        };
        if op & 4 != 0 {
            let _ = pci.write(region, offset, &value[..size]);
        } else {
            let mut buf = [0u8; 8];
            let _ = pci.read(region, offset, &mut buf[..size]);
        }
    }
    // Let a worker that was kicked look at the rings before the device goes.
    std::thread::sleep(Duration::from_micros(200));
    pci.reset();
});
