//! vfio-user protocol tests over a raw Unix socket against an in-process
//! `VfioUserServer` (QEMU `docs/interop/vfio-user.rst`): every command, every class of
//! bad input, each with the exact errno of the error reply and a check that the server
//! still serves afterwards (on the same connection, or on a new one where the server is
//! expected to drop the connection).

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::device::*;
use common::*;
use unidev_core::irq::IrqKind;
use unidev_core::memory::Prot;
use unidev_core::pci::PciRegion;
use unidev_transports::vfio_user::codec::decode_sparse_mmap;
use unidev_transports::vfio_user::{DmaRwLayout, ServerConfig};

const EINVAL: i32 = libc::EINVAL;

fn opts_with(config: ServerConfig) -> Opts {
    Opts {
        config,
        ..Opts::default()
    }
}

fn config() -> ServerConfig {
    Opts::default().config
}

// ---------------------------------------------------------------------------------------
// VERSION

#[test]
fn version_negotiates_and_announces_capabilities() {
    let h = Harness::start();
    let mut c = h.connect();
    let json = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"twin_socket":{"supported":true}}}"#;
    let p = P::new().u16(0).u16(7).bytes(json).bytes(&[0]).done();
    c.send_as(0x4242, cmd::VERSION, 0, &p, &[]);
    let r = c.reply(0x4242, cmd::VERSION);
    assert_eq!(r.flags, F_REPLY);
    let p = r.ok();
    assert_eq!(u16_at(p, 0), 0, "major");
    let minor = u16_at(p, 2);
    assert!(minor <= 7);
    assert_eq!(
        minor,
        unidev_transports::vfio_user::session::VERSION_MINOR.min(7)
    );
    let v = parse_caps(p);
    let caps = &v["capabilities"];
    let fds = caps["max_msg_fds"].as_u64().unwrap();
    assert!((1..=16).contains(&fds), "QEMU rejects more than 16");
    assert_eq!(fds, 16);
    assert_eq!(caps["max_data_xfer_size"].as_u64(), Some(1 << 20));
    assert_eq!(caps["pgsizes"].as_u64(), Some(4096));
    assert_eq!(caps["max_dma_maps"].as_u64(), Some(65535));
    assert_eq!(caps["write_multiple"].as_bool(), Some(true));
    // Twin-socket mode is not offered even when the client supports it.
    assert_ne!(caps["twin_socket"]["supported"].as_bool(), Some(true));
    c.assert_alive();
    drop(c);

    // A client proposing minor 0 gets minor 0.
    let mut c = h.connect();
    let r = c.call(cmd::VERSION, &P::new().u16(0).u16(0).done());
    assert_eq!((u16_at(r.ok(), 0), u16_at(r.ok(), 2)), (0, 0));
    c.assert_alive();
}

#[test]
fn version_capabilities_follow_the_server_config() {
    let h = Harness::with(Opts {
        config: ServerConfig {
            max_msg_fds: 4,
            max_data_xfer_size: 65536,
            ..config()
        },
        max_maps: 3,
        ..Opts::default()
    });
    let mut c = h.connect();
    let caps = c.negotiate();
    let caps = &caps["capabilities"];
    assert_eq!(caps["max_msg_fds"].as_u64(), Some(4));
    assert_eq!(caps["max_data_xfer_size"].as_u64(), Some(65536));
    assert_eq!(caps["max_dma_maps"].as_u64(), Some(3));
    // The advertised fd limit is enforced when the message is framed, before the command
    // is even looked at: an unknown command with 5 fds is EINVAL, with 4 it is ENOSYS.
    let efds: Vec<_> = (0..5).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    c.call_fds(99, &[], &raw).errno(EINVAL);
    c.call_fds(99, &[], &raw[..4]).errno(libc::ENOSYS);
    let set = set_irqs(
        irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        4,
        &[],
    );
    c.call_fds(cmd::DEVICE_SET_IRQS, &set, &raw).errno(EINVAL);
    assert!(!h.irqs.has_eventfd(IrqKind::Msix, 0));
    c.call_fds(cmd::DEVICE_SET_IRQS, &set, &raw[..4]).ok();
    assert!(h.irqs.has_eventfd(IrqKind::Msix, 3));
}

#[test]
fn version_without_capabilities_is_accepted() {
    let h = Harness::start();
    let mut c = h.connect();
    let r = c.call(cmd::VERSION, &P::new().u16(0).u16(1).done());
    let caps = parse_caps(r.ok());
    assert_eq!(caps["capabilities"]["pgsizes"].as_u64(), Some(4096));
    c.assert_alive();
}

#[test]
fn command_before_version_is_einval() {
    let h = Harness::start();
    let mut c = h.connect();
    c.call(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0))
        .errno(EINVAL);
    c.call(cmd::REGION_READ, &region_rw(region::CONFIG, 0, 4, &[]))
        .errno(EINVAL);
    c.call(cmd::DMA_MAP, &dma_map(3, 0, 0x10000, 0x1000))
        .errno(EINVAL);
    assert!(h.dma.is_empty());
    c.negotiate();
    c.assert_alive();
}

#[test]
fn version_twice_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(cmd::VERSION, &P::new().u16(0).u16(0).done())
        .errno(EINVAL);
    c.assert_alive();
}

#[test]
fn version_with_another_major_is_enotsup() {
    let h = Harness::start();
    let mut c = h.connect();
    for major in [1u16, 0xffff] {
        c.call(cmd::VERSION, &P::new().u16(major).u16(0).done())
            .errno(libc::ENOTSUP);
    }
    // Still not negotiated, but still served.
    c.call(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0))
        .errno(EINVAL);
    c.negotiate();
    c.assert_alive();
}

#[test]
fn version_with_bad_capabilities_is_einval() {
    let h = Harness::start();
    let mut c = h.connect();
    let bad: [&[u8]; 6] = [
        b"{not json",
        b"\xff\xfe",
        br#"{"capabilities":{"max_data_xfer_size":0}}"#,
        br#"{"capabilities":{"max_data_xfer_size":"big"}}"#,
        br#"{"capabilities":{"pgsizes":8192}}"#,
        br#"{"capabilities":{"pgsizes":"4k"}}"#,
    ];
    for json in bad {
        let p = P::new().u16(0).u16(0).bytes(json).bytes(&[0]).done();
        c.call(cmd::VERSION, &p).errno(EINVAL);
    }
    // Truncated: no minor.
    c.call(cmd::VERSION, &[0, 0]).errno(EINVAL);
    c.call(cmd::VERSION, &[]).errno(EINVAL);
    c.negotiate();
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// Framing

#[test]
fn replies_echo_the_message_id_and_set_the_reply_type() {
    let h = Harness::start();
    let mut c = h.client();
    for id in [0u16, 1, 0x7fff, 0xfffe, 0xffff] {
        c.send_as(id, cmd::DEVICE_GET_INFO, 0, &four_u32(16, 0, 0, 0), &[]);
        let r = c.reply(id, cmd::DEVICE_GET_INFO);
        assert_eq!((r.flags, r.error), (F_REPLY, 0));
        assert_eq!(r.size, 32);
    }
    // Error replies echo the ID as well.
    c.send_as(0xbeef, cmd::REGION_READ, 0, &region_rw(9, 0, 4, &[]), &[]);
    let r = c.reply(0xbeef, cmd::REGION_READ);
    assert_eq!(r.flags, F_REPLY | F_ERROR);
    r.errno(EINVAL);
    c.assert_alive();
}

#[test]
fn posted_writes_get_no_reply_and_are_processed_in_order() {
    let h = Harness::start();
    let mut c = h.client();
    for v in 1u8..=3 {
        c.post(
            cmd::REGION_WRITE,
            &region_rw(region::BAR1, 0, 4, &[v, 0, 0, v]),
        );
    }
    // A failing posted write gets no error reply either.
    c.post(cmd::REGION_WRITE, &region_rw(9, 0, 1, &[0x55]));
    c.post(cmd::REGION_WRITE, &region_rw(region::BAR1, 4, 1, &[0xaa]));
    c.post(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0));
    // The first message back is the read's reply, and it sees every posted write.
    let data = c.read_region(region::BAR1, 0, 8);
    assert_eq!(data, [3, 0, 0, 3, 0xaa, 0, 0, 0]);
    let writes: Vec<(u64, Vec<u8>)> = h
        .record
        .lock()
        .unwrap()
        .writes
        .iter()
        .map(|(_, o, d)| (*o, d.clone()))
        .collect();
    assert_eq!(
        writes,
        vec![
            (0, vec![1, 0, 0, 1]),
            (0, vec![2, 0, 0, 2]),
            (0, vec![3, 0, 0, 3]),
            (4, vec![0xaa]),
        ]
    );
    c.assert_alive();
}

#[test]
fn header_size_below_16_drops_the_connection() {
    let h = Harness::start();
    for size in [0u32, 8, 15] {
        let c = h.client();
        c.send_bytes(&header(1, cmd::DEVICE_GET_INFO, size, 0, 0), &[]);
        assert!(c.closed_by_server(), "size {size}: connection kept");
        h.client().assert_alive();
    }
    // A size too absurd to drain also ends the connection.
    let c = h.client();
    c.send_bytes(&header(1, cmd::REGION_WRITE, u32::MAX, 0, 0), &[]);
    assert!(c.closed_by_server());
    h.client().assert_alive();
}

#[test]
fn oversized_message_is_e2big_and_the_connection_keeps_working() {
    let max = 65536u32;
    let h = Harness::with(opts_with(ServerConfig {
        max_data_xfer_size: max,
        ..config()
    }));
    let mut c = h.client();
    // One byte over the message limit (max_data_xfer_size + 4096).
    let size = max as usize + 4096 + 1;
    let count = size - 32;
    let p = region_rw(region::BAR1, 0, count as u32, &vec![0x11; count]);
    assert_eq!(16 + p.len(), size);
    c.send_as(77, cmd::REGION_WRITE, 0, &p, &[]);
    c.reply(77, cmd::REGION_WRITE).errno(libc::E2BIG);
    assert!(h.record.lock().unwrap().writes.is_empty());
    // The payload was skipped exactly: the stream is still framed.
    c.write_region(region::BAR1, 0, &[1, 2]);
    assert_eq!(c.read_region(region::BAR1, 0, 2), [1, 2]);
    c.assert_alive();
}

#[test]
fn truncated_payloads_of_fixed_size_commands_are_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let fixed = [
        (cmd::DMA_MAP, 32),
        (cmd::DMA_UNMAP, 24),
        (cmd::DEVICE_GET_INFO, 16),
        (cmd::DEVICE_GET_REGION_INFO, 32),
        (cmd::DEVICE_GET_REGION_IO_FDS, 16),
        (cmd::DEVICE_GET_IRQ_INFO, 16),
        (cmd::DEVICE_SET_IRQS, 20),
        (cmd::REGION_READ, 16),
        (cmd::REGION_WRITE, 16),
        (cmd::REGION_WRITE_MULTI, 8),
    ];
    for (command, len) in fixed {
        for short in [0, 1, len / 2, len - 1] {
            // Payloads that would be valid if complete (argsz = full size).
            let mut p = vec![0u8; short];
            if short >= 4 {
                p[..4].copy_from_slice(&(len as u32).to_le_bytes());
            }
            let r = c.call(command, &p);
            assert!(
                r.flags & F_ERROR != 0,
                "command {command} with {short} bytes"
            );
            r.errno(EINVAL);
        }
    }
    // WRITE_MULTI announcing more entries than it carries.
    let p = P::new()
        .u64(2)
        .u64(0)
        .u32(region::BAR1)
        .u32(1)
        .u64(0)
        .done();
    c.call(cmd::REGION_WRITE_MULTI, &p).errno(EINVAL);
    assert!(h.dma.is_empty());
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn unknown_commands_are_enosys() {
    let h = Harness::start();
    // Even before VERSION.
    let mut c = h.connect();
    c.call(19, &[]).errno(libc::ENOSYS);
    c.negotiate();
    for command in [0u16, 19, 20, 0x100, 0xffff] {
        c.call(command, &[1, 2, 3, 4]).errno(libc::ENOSYS);
    }
    c.assert_alive();
}

#[test]
fn more_fds_than_max_msg_fds_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let efds: Vec<_> = (0..17).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = efds.iter().map(|e| e.as_raw_fd()).collect();
    // Refused when framed: even an unknown command gets EINVAL rather than ENOSYS.
    c.call_fds(99, &[1, 2, 3, 4], &raw).errno(EINVAL);
    c.call_fds(99, &[1, 2, 3, 4], &raw[..16])
        .errno(libc::ENOSYS);
    let set = set_irqs(
        irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        4,
        &[],
    );
    c.call_fds(cmd::DEVICE_SET_IRQS, &set, &raw).errno(EINVAL);
    assert!((0..4).all(|v| !h.irqs.has_eventfd(IrqKind::Msix, v)));
    // A DMA_MAP with 17 fds is refused before anything is mapped.
    let f = memfd("map", 0x1000);
    let many: Vec<RawFd> = std::iter::repeat_n(f.as_raw_fd(), 17).collect();
    c.call_fds(cmd::DMA_MAP, &dma_map(3, 0, 0x10000, 0x1000), &many)
        .errno(EINVAL);
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn fds_on_a_command_that_takes_none_are_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let e = eventfd();
    c.call_fds(
        cmd::DEVICE_GET_INFO,
        &four_u32(16, 0, 0, 0),
        &[e.as_raw_fd()],
    )
    .errno(EINVAL);
    let f = memfd("x", 0x1000);
    c.call_fds(
        cmd::REGION_WRITE,
        &region_rw(region::BAR1, 0, 1, &[9]),
        &[f.as_raw_fd()],
    )
    .errno(EINVAL);
    assert!(
        h.record.lock().unwrap().writes.is_empty(),
        "refused write applied"
    );
    c.call_fds(cmd::DMA_UNMAP, &dma_unmap(2, 0, 0), &[f.as_raw_fd()])
        .errno(EINVAL);
    c.assert_alive();
}

#[test]
fn a_stalled_half_message_is_dropped_after_the_io_timeout() {
    let timeout = Duration::from_millis(300);
    let h = Harness::with(opts_with(ServerConfig {
        io_timeout: timeout,
        ..config()
    }));
    // Half a header.
    let c = h.client();
    let t0 = Instant::now();
    c.send_bytes(&header(1, cmd::DEVICE_GET_INFO, 32, 0, 0)[..8], &[]);
    assert!(c.closed_by_server());
    let took = t0.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(50) && took < Duration::from_secs(3),
        "dropped after {took:?}"
    );
    h.client().assert_alive();

    // A whole header and half of its payload.
    let c = h.client();
    let t0 = Instant::now();
    let mut m = header(2, cmd::DEVICE_GET_INFO, 32, 0, 0);
    m.extend_from_slice(&[16, 0, 0, 0, 0, 0, 0, 0]);
    c.send_bytes(&m, &[]);
    assert!(c.closed_by_server());
    assert!(t0.elapsed() >= timeout - Duration::from_millis(50));
    let mut c2 = h.client();
    c2.assert_alive();
    c2.write_region(region::BAR1, 0, &[5]);
}

// ---------------------------------------------------------------------------------------
// DMA_MAP / DMA_UNMAP

const R: u32 = 1;
const W: u32 = 2;

/// A doorbell write payload: BAR1 at DOORBELL, iova/len/op.
fn doorbell(iova: u64, len: u32, op: u32) -> Vec<u8> {
    let data = P::new().u64(iova).u32(len).u32(op).done();
    region_rw(region::BAR1, DOORBELL, 16, &data)
}

#[test]
fn dma_map_with_a_memfd_is_mmapped_and_reachable_by_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("guest-ram", 0x4000);
    let init: Vec<u8> = (0..0x4000u32).map(|i| ((i * 3) ^ (i >> 8)) as u8).collect();
    f.write_all_at(&init, 0).unwrap();
    let r = c.call_fds(
        cmd::DMA_MAP,
        &dma_map(R | W, 0x1000, 0x10_0000, 0x2000),
        &[f.as_raw_fd()],
    );
    assert!(r.ok().is_empty());
    assert_eq!(h.dma.len(), 1);
    let m = h.dma.find(0x10_1fff).unwrap();
    assert_eq!(
        (m.iova, m.size, m.prot),
        (0x10_0000, 0x2000, Prot::READ_WRITE)
    );
    assert!(m.has_fd());
    // The device reads and writes the client's file directly: no DMA messages (the
    // next message is the write's reply, which `write_region` checks).
    c.write_region(
        region::BAR1,
        DOORBELL,
        &P::new().u64(0x10_0010).u32(64).u32(DB_OP_READ).done(),
    );
    assert_eq!(h.record.lock().unwrap().dma_in, &init[0x1010..0x1050]);
    c.write_region(
        region::BAR1,
        DOORBELL,
        &P::new().u64(0x10_1ff0).u32(16).u32(DB_OP_WRITE).done(),
    );
    let mut got = [0u8; 16];
    f.read_exact_at(&mut got, 0x2ff0).unwrap();
    let want: Vec<u8> = (0..16).map(dma_pattern).collect();
    assert_eq!(got.to_vec(), want);
    c.assert_alive();
}

#[test]
fn dma_map_without_fd_is_recorded_for_the_message_path() {
    let h = Harness::start();
    let mut c = h.client();
    assert!(c
        .call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x20_0000, 0x1000))
        .ok()
        .is_empty());
    c.call(cmd::DMA_MAP, &dma_map(R, 0, 0x20_1000, 0x1000)).ok();
    let maps = h.dma.maps();
    assert_eq!(maps.len(), 2);
    assert!(!maps[0].has_fd() && !maps[1].has_fd());
    assert_eq!(maps[0].prot, Prot::READ_WRITE);
    assert_eq!(maps[1].prot, Prot::READ_ONLY);
    c.assert_alive();
}

#[test]
fn dma_map_overlapping_an_existing_map_is_eexist() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x10000, 0x2000))
        .ok();
    for (addr, size) in [
        (0x10000, 0x2000),
        (0xf000, 0x2000),
        (0x11000, 0x1000),
        (0, 0x100000),
    ] {
        c.call(cmd::DMA_MAP, &dma_map(R | W, 0, addr, size))
            .errno(libc::EEXIST);
    }
    // Adjacent is fine.
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x12000, 0x1000))
        .ok();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0xf000, 0x1000))
        .ok();
    assert_eq!(h.dma.len(), 3);
    c.assert_alive();
}

#[test]
fn dma_map_unaligned_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("ram", 0x4000);
    for (offset, addr, size) in [
        (0, 0x10800, 0x1000),
        (0, 0x10000, 0x800),
        (0x800, 0x10000, 0x1000),
        (0, 0x10001, 0x1000),
    ] {
        c.call_fds(
            cmd::DMA_MAP,
            &dma_map(R | W, offset, addr, size),
            &[f.as_raw_fd()],
        )
        .errno(EINVAL);
        c.call(cmd::DMA_MAP, &dma_map(R | W, offset, addr, size))
            .errno(EINVAL);
    }
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_map_with_bad_flags_or_size_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for flags in [4, R | W | 0x100, 0x8000_0000] {
        c.call(cmd::DMA_MAP, &dma_map(flags, 0, 0x10000, 0x1000))
            .errno(EINVAL);
    }
    // Neither readable nor writable; zero size; wrapping range; argsz too small.
    c.call(cmd::DMA_MAP, &dma_map(0, 0, 0x10000, 0x1000))
        .errno(EINVAL);
    c.call(cmd::DMA_MAP, &dma_map(R, 0, 0x10000, 0))
        .errno(EINVAL);
    c.call(cmd::DMA_MAP, &dma_map(R, 0, 0xffff_ffff_ffff_f000, 0x2000))
        .errno(EINVAL);
    let mut p = dma_map(R, 0, 0x10000, 0x1000);
    p[..4].copy_from_slice(&31u32.to_le_bytes());
    c.call(cmd::DMA_MAP, &p).errno(EINVAL);
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_map_with_an_fd_smaller_than_the_range_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("small", 0x2000);
    for (offset, size) in [(0x1000, 0x2000), (0, 0x3000), (0x2000, 0x1000)] {
        c.call_fds(
            cmd::DMA_MAP,
            &dma_map(R | W, offset, 0x10000, size),
            &[f.as_raw_fd()],
        )
        .errno(EINVAL);
    }
    assert!(h.dma.is_empty());
    c.call_fds(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, 0x10000, 0x2000),
        &[f.as_raw_fd()],
    )
    .ok();
    assert_eq!(h.dma.len(), 1);
    c.assert_alive();
}

#[test]
fn dma_map_with_an_fd_that_is_not_a_regular_file_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let (rd, _wr) = pipe();
    let e = eventfd();
    let (s1, _s2) = UnixStream::pair().unwrap();
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    for fd in [
        rd.as_raw_fd(),
        e.as_raw_fd(),
        s1.as_raw_fd(),
        dir.as_raw_fd(),
    ] {
        c.call_fds(cmd::DMA_MAP, &dma_map(R | W, 0, 0x10000, 0x1000), &[fd])
            .errno(EINVAL);
    }
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_map_with_two_fds_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let (a, b) = (memfd("a", 0x1000), memfd("b", 0x1000));
    c.call_fds(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, 0x10000, 0x1000),
        &[a.as_raw_fd(), b.as_raw_fd()],
    )
    .errno(EINVAL);
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_map_past_the_cap_is_enospc() {
    let h = Harness::with(Opts {
        max_maps: 3,
        ..Opts::default()
    });
    let mut c = h.client();
    for i in 0..3u64 {
        c.call(cmd::DMA_MAP, &dma_map(R | W, 0, i * 0x10000, 0x1000))
            .ok();
    }
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x100000, 0x1000))
        .errno(libc::ENOSPC);
    assert_eq!(h.dma.len(), 3);
    c.call(cmd::DMA_UNMAP, &dma_unmap(0, 0x10000, 0x1000)).ok();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x100000, 0x1000))
        .ok();
    assert_eq!(h.dma.len(), 3);
    c.assert_alive();
}

#[test]
fn dma_unmap_of_an_exact_map_echoes_the_entry() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("ram", 0x3000);
    c.call_fds(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, 0x40000, 0x3000),
        &[f.as_raw_fd()],
    )
    .ok();
    c.call(cmd::DMA_MAP, &dma_map(R, 0, 0x80000, 0x1000)).ok();
    let r = c.call(cmd::DMA_UNMAP, &dma_unmap(0, 0x40000, 0x3000));
    let p = r.ok();
    assert_eq!(p.len(), 24);
    assert_eq!(
        (u32_at(p, 0), u32_at(p, 4), u64_at(p, 8), u64_at(p, 16)),
        (24, 0, 0x40000, 0x3000)
    );
    assert_eq!(h.dma.len(), 1);
    assert!(h.dma.find(0x40000).is_none());
    c.call(cmd::DMA_UNMAP, &dma_unmap(0, 0x80000, 0x1000)).ok();
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_unmap_that_matches_no_map_is_enoent() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x40000, 0x3000))
        .ok();
    for (addr, size) in [
        (0x40000, 0x1000),
        (0x41000, 0x2000),
        (0x40000, 0x4000),
        (0x80000, 0x3000),
    ] {
        c.call(cmd::DMA_UNMAP, &dma_unmap(0, addr, size))
            .errno(libc::ENOENT);
    }
    assert_eq!(h.dma.len(), 1);
    c.assert_alive();
}

#[test]
fn dma_unmap_all_removes_every_map() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("ram", 0x1000);
    c.call_fds(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, 0x10000, 0x1000),
        &[f.as_raw_fd()],
    )
    .ok();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x20000, 0x1000))
        .ok();
    c.call(cmd::DMA_MAP, &dma_map(R, 0, 0x30000, 0x1000)).ok();
    assert_eq!(h.dma.len(), 3);
    let r = c.call(cmd::DMA_UNMAP, &dma_unmap(2, 0, 0));
    let p = r.ok();
    assert_eq!(p.len(), 24);
    assert_eq!(u32_at(p, 4), 2);
    assert_eq!(h.dma.len(), 0);
    // Unmap-all with nothing mapped is fine too.
    c.call(cmd::DMA_UNMAP, &dma_unmap(2, 0, 0)).ok();
    c.assert_alive();
}

#[test]
fn dma_unmap_all_with_an_address_or_size_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x40000, 0x1000))
        .ok();
    c.call(cmd::DMA_UNMAP, &dma_unmap(2, 0x40000, 0x1000))
        .errno(EINVAL);
    c.call(cmd::DMA_UNMAP, &dma_unmap(2, 0x40000, 0))
        .errno(EINVAL);
    c.call(cmd::DMA_UNMAP, &dma_unmap(2, 0, 0x1000))
        .errno(EINVAL);
    assert_eq!(h.dma.len(), 1);
    c.assert_alive();
}

#[test]
fn dma_unmap_with_dirty_bitmap_is_enotsup_and_other_flags_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x40000, 0x1000))
        .ok();
    c.call(cmd::DMA_UNMAP, &dma_unmap(1, 0x40000, 0x1000))
        .errno(libc::ENOTSUP);
    c.call(cmd::DMA_UNMAP, &dma_unmap(4, 0x40000, 0x1000))
        .errno(EINVAL);
    let mut p = dma_unmap(0, 0x40000, 0x1000);
    p[..4].copy_from_slice(&16u32.to_le_bytes());
    c.call(cmd::DMA_UNMAP, &p).errno(EINVAL);
    assert_eq!(h.dma.len(), 1);
    c.assert_alive();
}

#[test]
fn disconnect_drops_all_maps_and_irq_eventfds_but_keeps_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("ram", 0x2000);
    c.call_fds(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, 0x10000, 0x2000),
        &[f.as_raw_fd()],
    )
    .ok();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x20000, 0x1000))
        .ok();
    let msix: Vec<_> = (0..4).map(|_| eventfd()).collect();
    c.set_irq_fds(
        irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        &msix.iter().collect::<Vec<_>>(),
    );
    let (intx, unmask) = (eventfd(), eventfd());
    c.set_irq_fds(irq::ACTION_TRIGGER, irq::INTX, 0, &[&intx]);
    c.set_irq_fds(irq::ACTION_UNMASK, irq::INTX, 0, &[&unmask]);
    c.set_irq_fds(irq::ACTION_TRIGGER, irq::REQ, 0, &[&eventfd()]);
    c.write_region(region::BAR1, 0x20, &[0x5a]);
    assert_eq!(h.dma.len(), 2);
    assert!(h.irqs.has_eventfd(IrqKind::Msix, 3));
    drop(c);
    assert!(wait_until(
        || h.dma.is_empty() && h.record.lock().unwrap().detached == 1
    ));
    for kind in IrqKind::ALL {
        for line in 0..4 {
            assert!(!h.irqs.has_eventfd(kind, line), "{kind:?} {line}");
        }
    }
    assert!(h.irqs.unmask_fds().is_empty());
    // The old eventfds are no longer signalled.
    assert!(!h.irqs.signal(IrqKind::Msix, 0));
    assert_eq!(fired(&msix[0]), 0);
    // The device kept its state.
    let mut c = h.client();
    assert_eq!(c.read_region(region::BAR1, 0x20, 1), [0x5a]);
}

#[test]
fn no_fd_leak_across_connect_map_disconnect_cycles() {
    let h = Harness::with(Opts {
        exclusive: true,
        ..Opts::default()
    });
    let cycle = |h: &Harness| {
        let mut c = h.client();
        let ram = memfd("ram", 0x4000);
        c.call_fds(
            cmd::DMA_MAP,
            &dma_map(R | W, 0, 0x10000, 0x4000),
            &[ram.as_raw_fd()],
        )
        .ok();
        c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x20000, 0x1000))
            .ok();
        // Refused fds must be closed as well.
        c.call_fds(
            cmd::DMA_MAP,
            &dma_map(R | W, 0, 0x30000, 0x1000),
            &[ram.as_raw_fd(), ram.as_raw_fd()],
        )
        .errno(EINVAL);
        let many: Vec<RawFd> = std::iter::repeat_n(ram.as_raw_fd(), 17).collect();
        c.call_fds(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0), &many)
            .errno(EINVAL);
        c.call_fds(
            cmd::DEVICE_GET_INFO,
            &four_u32(16, 0, 0, 0),
            &[ram.as_raw_fd()],
        )
        .errno(EINVAL);
        let msix: Vec<_> = (0..4).map(|_| eventfd()).collect();
        c.set_irq_fds(
            irq::ACTION_TRIGGER,
            irq::MSIX,
            0,
            &msix.iter().collect::<Vec<_>>(),
        );
        let (intx, unmask) = (eventfd(), eventfd());
        c.set_irq_fds(irq::ACTION_TRIGGER, irq::INTX, 0, &[&intx]);
        c.set_irq_fds(irq::ACTION_UNMASK, irq::INTX, 0, &[&unmask]);
        // Replacing eventfds closes the old ones.
        c.set_irq_fds(irq::ACTION_TRIGGER, irq::INTX, 0, &[&eventfd()]);
        for index in [region::BAR0, region::BAR2] {
            let r = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(256, index));
            assert_eq!(r.fds.len(), 1);
        }
        c.write_region(region::BAR1, 0, &[1]);
        drop(c);
        assert!(wait_until(|| h.dma.is_empty()
            && h.irqs.unmask_fds().is_empty()
            && !h.irqs.has_eventfd(IrqKind::Intx, 0)));
    };
    cycle(&h);
    let before = open_fds();
    for _ in 0..20 {
        cycle(&h);
    }
    let mut after = 0;
    let settled = wait_until(|| {
        after = open_fds();
        after == before
    });
    assert!(settled, "{before} fds before, {after} after 20 cycles");
}

// ---------------------------------------------------------------------------------------
// DEVICE_GET_INFO

#[test]
fn device_info_reports_pci_reset_9_regions_5_irqs() {
    let h = Harness::start();
    let mut c = h.client();
    for argsz in [16u32, 24, 4096] {
        let r = c.call(cmd::DEVICE_GET_INFO, &four_u32(argsz, 0, 0, 0));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(
            (u32_at(p, 0), u32_at(p, 4), u32_at(p, 8), u32_at(p, 12)),
            (16, 0b11, 9, 5)
        );
    }
    let h2 = Harness::with(Opts {
        can_reset: false,
        ..Opts::default()
    });
    let mut c2 = h2.client();
    let r = c2.call(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0));
    assert_eq!(u32_at(r.ok(), 4), 0b10, "PCI without RESET");
}

#[test]
fn device_info_with_too_small_argsz_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for argsz in [0u32, 8, 15] {
        c.call(cmd::DEVICE_GET_INFO, &four_u32(argsz, 0, 0, 0))
            .errno(EINVAL);
    }
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DEVICE_GET_REGION_INFO

const RI_READ: u32 = 1;
const RI_WRITE: u32 = 2;
const RI_MMAP: u32 = 4;
const RI_CAPS: u32 = 8;

#[test]
fn region_info_for_every_index() {
    let h = Harness::start();
    let mut c = h.client();
    // (argsz needed, flags, size, offset, fds)
    let rw = RI_READ | RI_WRITE;
    let expect = [
        (64, rw | RI_MMAP | RI_CAPS, BAR0_SIZE, 0, 1),
        (32, rw, BAR1_SIZE, 0, 0),
        (32, rw | RI_MMAP, BAR2_SIZE, BAR2_FILE_OFFSET, 1),
        (32, 0, 0, 0, 0),
        (32, 0, 0, 0, 0),
        (32, 0, 0, 0, 0),
        (32, 0, 0, 0, 0),
        (32, rw, CONFIG_SIZE, 0, 0),
        (32, 0, 0, 0, 0),
    ];
    for (index, (argsz, flags, size, offset, nfds)) in expect.into_iter().enumerate() {
        let r = c.call(
            cmd::DEVICE_GET_REGION_INFO,
            &region_info_req(256, index as u32),
        );
        let p = r.ok();
        assert_eq!(p.len(), argsz as usize, "region {index}");
        assert_eq!(u32_at(p, 0), argsz, "region {index} argsz");
        assert_eq!(u32_at(p, 4), flags, "region {index} flags");
        assert_eq!(u32_at(p, 8), index as u32, "region {index} index");
        let cap_offset = if flags & RI_CAPS != 0 { 32 } else { 0 };
        assert_eq!(u32_at(p, 12), cap_offset, "region {index} cap_offset");
        assert_eq!(u64_at(p, 16), size, "region {index} size");
        assert_eq!(u64_at(p, 24), offset, "region {index} offset");
        assert_eq!(r.fds.len(), nfds, "region {index} fds");
    }
    c.assert_alive();
}

/// mmap `len` bytes of `fd` at `offset` and return a copy, after writing `poke` at the
/// start of the mapping.
fn mmap_peek_poke(fd: RawFd, offset: u64, len: usize, poke: &[u8]) -> Vec<u8> {
    // SAFETY: a fresh shared mapping of a file we own; checked for failure, only
    // accessed within `len` bytes, and unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let copy = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        std::ptr::copy_nonoverlapping(poke.as_ptr(), p as *mut u8, poke.len());
        libc::munmap(p, len);
        copy
    }
}

#[test]
fn region_info_for_bar0_has_the_sparse_mmap_capability_and_a_mappable_fd() {
    let h = Harness::start();
    let mut c = h.client();
    let r = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(64, 0));
    let p = r.ok().to_vec();
    assert_eq!(u32_at(&p, 4), RI_READ | RI_WRITE | RI_MMAP | RI_CAPS);
    let cap_offset = u32_at(&p, 12);
    assert_eq!(cap_offset, 32);
    // struct vfio_region_info_cap_sparse_mmap, byte by byte.
    assert_eq!(u16_at(&p, 32), 1, "VFIO_REGION_INFO_CAP_SPARSE_MMAP");
    assert_eq!(u16_at(&p, 34), 1, "version");
    assert_eq!(u32_at(&p, 36), 0, "next");
    assert_eq!(u32_at(&p, 40), 1, "nr_areas");
    assert_eq!((u64_at(&p, 48), u64_at(&p, 56)), BAR0_AREA);
    assert_eq!(
        decode_sparse_mmap(&p, cap_offset).unwrap(),
        Some(vec![BAR0_AREA])
    );
    assert_eq!(r.fds.len(), 1);
    let base = u64_at(&p, 24);
    let bytes = mmap_peek_poke(
        r.fds[0].as_raw_fd(),
        base + BAR0_AREA.0,
        BAR0_AREA.1 as usize,
        &[0xc3, 0x3c],
    );
    let want: Vec<u8> = (BAR0_AREA.0..BAR0_AREA.0 + BAR0_AREA.1)
        .map(mem_pattern)
        .collect();
    assert_eq!(bytes, want);
    // The mapping is the device's memory: a trapped read sees what the client stored.
    assert_eq!(c.read_region(region::BAR0, BAR0_AREA.0, 2), [0xc3, 0x3c]);
    c.assert_alive();
}

#[test]
fn region_info_for_bar2_is_mappable_whole_without_capabilities() {
    let h = Harness::start();
    let mut c = h.client();
    let r = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(32, 2));
    let p = r.ok();
    assert_eq!(p.len(), 32);
    assert_eq!(u32_at(p, 0), 32);
    assert_eq!(u32_at(p, 4), RI_READ | RI_WRITE | RI_MMAP);
    assert_eq!(u32_at(p, 12), 0);
    assert_eq!(u64_at(p, 16), BAR2_SIZE);
    assert_eq!(u64_at(p, 24), BAR2_FILE_OFFSET);
    assert_eq!(r.fds.len(), 1);
    let bytes = mmap_peek_poke(
        r.fds[0].as_raw_fd(),
        BAR2_FILE_OFFSET,
        BAR2_SIZE as usize,
        &[0x99],
    );
    let want: Vec<u8> = (BAR2_FILE_OFFSET..BAR2_FILE_OFFSET + BAR2_SIZE)
        .map(mem_pattern)
        .collect();
    assert_eq!(bytes, want);
    assert_eq!(c.read_region(region::BAR2, 0, 1), [0x99]);
    c.assert_alive();
}

#[test]
fn region_info_with_a_short_argsz_reports_the_size_needed_without_caps_or_fd() {
    let h = Harness::start();
    let mut c = h.client();
    let r = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(32, 0));
    let p = r.ok();
    assert_eq!(p.len(), 32, "only the fixed part fits");
    assert_eq!(u32_at(p, 0), 64, "argsz = size needed");
    // QEMU's client rejects CAPS with a cap_offset outside the reply, so a reply that
    // carries no capabilities must not claim any.
    assert_eq!(u32_at(p, 4), RI_READ | RI_WRITE | RI_MMAP);
    assert_eq!(u32_at(p, 12), 0, "cap_offset");
    assert_eq!(u64_at(p, 16), BAR0_SIZE);
    assert!(r.fds.is_empty(), "the fd comes with the full answer only");
    // The retry with the size asked for gets everything.
    let r = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(64, 0));
    let p = r.ok();
    assert_eq!(p.len(), 64);
    assert_eq!(u32_at(p, 4), RI_READ | RI_WRITE | RI_MMAP | RI_CAPS);
    assert_eq!(u32_at(p, 12), 32);
    assert_eq!(r.fds.len(), 1);
    c.assert_alive();
}

#[test]
fn region_info_for_a_bad_index_or_argsz_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for index in [9u32, 10, u32::MAX] {
        c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(256, index))
            .errno(EINVAL);
    }
    c.call(cmd::DEVICE_GET_REGION_INFO, &region_info_req(31, 0))
        .errno(EINVAL);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DEVICE_GET_REGION_IO_FDS

#[test]
fn region_io_fds_are_empty_and_checked() {
    let h = Harness::start();
    let mut c = h.client();
    for index in 0..9u32 {
        let r = c.call(cmd::DEVICE_GET_REGION_IO_FDS, &four_u32(1024, 0, index, 0));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(
            (u32_at(p, 0), u32_at(p, 4), u32_at(p, 8), u32_at(p, 12)),
            (16, 0, index, 0)
        );
        assert!(r.fds.is_empty());
    }
    c.call(cmd::DEVICE_GET_REGION_IO_FDS, &four_u32(16, 0, 9, 0))
        .errno(EINVAL);
    c.call(cmd::DEVICE_GET_REGION_IO_FDS, &four_u32(16, 1, 0, 0))
        .errno(EINVAL);
    c.call(cmd::DEVICE_GET_REGION_IO_FDS, &four_u32(8, 0, 0, 0))
        .errno(EINVAL);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DEVICE_GET_IRQ_INFO

#[test]
fn irq_info_for_every_index() {
    let h = Harness::start();
    let mut c = h.client();
    const EVENTFD: u32 = 1;
    const MASKABLE: u32 = 2;
    const AUTOMASKED: u32 = 4;
    const NORESIZE: u32 = 8;
    let expect = [
        (1, EVENTFD | MASKABLE | AUTOMASKED),
        (2, EVENTFD | MASKABLE | NORESIZE),
        (4, EVENTFD | MASKABLE),
        (1, EVENTFD),
        (1, EVENTFD),
    ];
    for (index, (count, flags)) in expect.into_iter().enumerate() {
        let r = c.call(cmd::DEVICE_GET_IRQ_INFO, &four_u32(16, 0, index as u32, 0));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(
            (u32_at(p, 0), u32_at(p, 4), u32_at(p, 8), u32_at(p, 12)),
            (16, flags, index as u32, count),
            "irq index {index}"
        );
    }
    c.call(cmd::DEVICE_GET_IRQ_INFO, &four_u32(16, 0, 5, 0))
        .errno(EINVAL);
    c.call(cmd::DEVICE_GET_IRQ_INFO, &four_u32(8, 0, 0, 0))
        .errno(EINVAL);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DEVICE_SET_IRQS

fn msix_fds(c: &mut Client) -> Vec<vmm_sys_util::eventfd::EventFd> {
    let fds: Vec<_> = (0..4).map(|_| eventfd()).collect();
    c.set_irq_fds(
        irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        &fds.iter().collect::<Vec<_>>(),
    );
    fds
}

fn fired_all(fds: &[vmm_sys_util::eventfd::EventFd]) -> Vec<u64> {
    fds.iter().map(fired).collect()
}

#[test]
fn set_irqs_eventfds_are_signalled_by_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    assert!((0..4).all(|v| h.irqs.has_eventfd(IrqKind::Msix, v)));
    assert!(h.irqs.signal(IrqKind::Msix, 1));
    assert!(h.irqs.signal(IrqKind::Msix, 1));
    assert_eq!(fired_all(&fds), [0, 2, 0, 0]);
    // A sub-range: MSI line 1 only.
    let msi = eventfd();
    c.set_irq_fds(irq::ACTION_TRIGGER, irq::MSI, 1, &[&msi]);
    assert!(!h.irqs.signal(IrqKind::Msi, 0));
    assert!(h.irqs.signal(IrqKind::Msi, 1));
    assert_eq!(fired(&msi), 1);
    c.assert_alive();
}

#[test]
fn set_irqs_ranges_past_the_line_count_are_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let e: Vec<_> = (0..3).map(|_| eventfd()).collect();
    let raw: Vec<RawFd> = e.iter().map(|e| e.as_raw_fd()).collect();
    let ev = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;
    let cases: [(u32, u32, u32, u32, &[RawFd]); 8] = [
        // A huge count without fds (found by fuzzing: it used to allocate per line).
        (ev, irq::MSIX, 0, u32::MAX - 1, &[]),
        (ev, irq::MSIX, 3, 2, &raw[..2]),
        (ev, irq::MSIX, 4, 1, &raw[..1]),
        (ev, irq::MSI, 0, 3, &raw[..3]),
        (ev, irq::INTX, 1, 1, &raw[..1]),
        (ev, irq::MSIX, u32::MAX, 2, &[]),
        (irq::DATA_NONE | irq::ACTION_TRIGGER, irq::MSIX, 0, 5, &[]),
        (irq::DATA_NONE | irq::ACTION_MASK, irq::ERR, 1, 1, &[]),
    ];
    for (flags, index, start, count, fds) in cases {
        c.call_fds(
            cmd::DEVICE_SET_IRQS,
            &set_irqs(flags, index, start, count, &[]),
            fds,
        )
        .errno(EINVAL);
    }
    for kind in IrqKind::ALL {
        assert!((0..4).all(|v| !h.irqs.has_eventfd(kind, v)));
    }
    c.assert_alive();
}

#[test]
fn set_irqs_eventfd_without_fds_deassigns_the_range() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(
            irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
            irq::MSIX,
            1,
            2,
            &[],
        ),
    )
    .ok();
    let attached: Vec<bool> = (0..4)
        .map(|v| h.irqs.has_eventfd(IrqKind::Msix, v))
        .collect();
    assert_eq!(attached, [true, false, false, true]);
    for v in 0..4 {
        h.irqs.signal(IrqKind::Msix, v);
    }
    assert_eq!(fired_all(&fds), [1, 0, 0, 1]);
    c.assert_alive();
}

#[test]
fn set_irqs_data_none_trigger_with_count_0_disables_the_index() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    let msi = eventfd();
    c.set_irq_fds(irq::ACTION_TRIGGER, irq::MSI, 0, &[&msi]);
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(irq::DATA_NONE | irq::ACTION_TRIGGER, irq::MSIX, 0, 0, &[]),
    )
    .ok();
    assert!((0..4).all(|v| !h.irqs.has_eventfd(IrqKind::Msix, v)));
    assert!(
        h.irqs.has_eventfd(IrqKind::Msi, 0),
        "other indices untouched"
    );
    assert!(!h.irqs.signal(IrqKind::Msix, 0));
    assert_eq!(fired_all(&fds), [0; 4]);
    // count 0 means "the whole index" only with start 0 and the TRIGGER action.
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(irq::DATA_NONE | irq::ACTION_TRIGGER, irq::MSI, 1, 0, &[]),
    )
    .errno(EINVAL);
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(irq::DATA_NONE | irq::ACTION_MASK, irq::MSI, 0, 0, &[]),
    )
    .errno(EINVAL);
    assert!(h.irqs.has_eventfd(IrqKind::Msi, 0));
    c.assert_alive();
}

#[test]
fn set_irqs_data_bool_masks_unmasks_and_triggers_selected_lines() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    let b = irq::DATA_BOOL;
    // Loopback trigger: only the true entries fire.
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(b | irq::ACTION_TRIGGER, irq::MSIX, 0, 4, &[1, 0, 2, 0]),
    )
    .ok();
    assert_eq!(fired_all(&fds), [1, 0, 1, 0]);
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(b | irq::ACTION_MASK, irq::MSIX, 0, 4, &[0, 1, 0, 1]),
    )
    .ok();
    let masked: Vec<bool> = (0..4).map(|v| h.irqs.masked(IrqKind::Msix, v)).collect();
    assert_eq!(masked, [false, true, false, true]);
    for v in 0..4 {
        h.irqs.signal(IrqKind::Msix, v);
    }
    assert_eq!(fired_all(&fds), [1, 0, 1, 0]);
    assert!(h.irqs.pending(IrqKind::Msix, 1) && h.irqs.pending(IrqKind::Msix, 3));
    // Unmask line 1 only (start 1, count 3, bools [1, 0, 0]): its pending signal fires.
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(b | irq::ACTION_UNMASK, irq::MSIX, 1, 3, &[1, 0, 0]),
    )
    .ok();
    assert_eq!(fired_all(&fds), [0, 1, 0, 0]);
    assert!(h.irqs.masked(IrqKind::Msix, 3) && h.irqs.pending(IrqKind::Msix, 3));
    c.assert_alive();
}

#[test]
fn set_irqs_data_none_mask_makes_signals_pending_until_unmask() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    let none = irq::DATA_NONE;
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(none | irq::ACTION_MASK, irq::MSIX, 2, 1, &[]),
    )
    .ok();
    assert!(!h.irqs.signal(IrqKind::Msix, 2));
    assert!(h.irqs.pending(IrqKind::Msix, 2));
    assert_eq!(fired_all(&fds), [0; 4]);
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(none | irq::ACTION_UNMASK, irq::MSIX, 2, 1, &[]),
    )
    .ok();
    assert_eq!(fired_all(&fds), [0, 0, 1, 0]);
    assert!(!h.irqs.pending(IrqKind::Msix, 2));
    // Loopback trigger without data.
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(none | irq::ACTION_TRIGGER, irq::MSIX, 3, 1, &[]),
    )
    .ok();
    assert_eq!(fired_all(&fds), [0, 0, 0, 1]);
    c.assert_alive();
}

#[test]
fn set_irqs_with_bad_flag_combinations_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    use irq::*;
    for flags in [
        DATA_NONE | DATA_BOOL | ACTION_TRIGGER,
        DATA_BOOL | DATA_EVENTFD | ACTION_TRIGGER,
        DATA_NONE | ACTION_MASK | ACTION_UNMASK,
        DATA_NONE | ACTION_MASK | ACTION_TRIGGER,
        DATA_NONE,
        ACTION_TRIGGER,
        0,
        DATA_NONE | ACTION_TRIGGER | 1 << 6,
    ] {
        c.call(cmd::DEVICE_SET_IRQS, &set_irqs(flags, MSIX, 0, 1, &[1]))
            .errno(EINVAL);
    }
    // Unknown index; argsz below the fixed size.
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(DATA_NONE | ACTION_TRIGGER, 5, 0, 1, &[]),
    )
    .errno(EINVAL);
    let mut p = set_irqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 1, &[]);
    p[..4].copy_from_slice(&19u32.to_le_bytes());
    c.call(cmd::DEVICE_SET_IRQS, &p).errno(EINVAL);
    assert_eq!(fired_all(&fds), [0; 4], "nothing was triggered");
    c.assert_alive();
}

#[test]
fn set_irqs_with_fd_count_different_from_count_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let (a, b) = (eventfd(), eventfd());
    let ev = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;
    c.call_fds(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(ev, irq::MSIX, 0, 2, &[]),
        &[a.as_raw_fd()],
    )
    .errno(EINVAL);
    c.call_fds(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(ev, irq::MSIX, 0, 1, &[]),
        &[a.as_raw_fd(), b.as_raw_fd()],
    )
    .errno(EINVAL);
    assert!((0..4).all(|v| !h.irqs.has_eventfd(IrqKind::Msix, v)));
    c.assert_alive();
}

#[test]
fn set_irqs_with_an_fd_that_is_not_an_eventfd_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("not-an-eventfd", 8);
    let (rd, _wr) = pipe();
    let ev = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;
    for fd in [f.as_raw_fd(), rd.as_raw_fd()] {
        c.call_fds(
            cmd::DEVICE_SET_IRQS,
            &set_irqs(ev, irq::MSIX, 0, 1, &[]),
            &[fd],
        )
        .errno(EINVAL);
    }
    // One good eventfd and one bad fd: nothing is attached.
    let e = eventfd();
    c.call_fds(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(ev, irq::MSIX, 0, 2, &[]),
        &[e.as_raw_fd(), f.as_raw_fd()],
    )
    .errno(EINVAL);
    // An fd with DATA_NONE.
    c.call_fds(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(irq::DATA_NONE | irq::ACTION_TRIGGER, irq::MSIX, 0, 1, &[]),
        &[e.as_raw_fd()],
    )
    .errno(EINVAL);
    assert!((0..4).all(|v| !h.irqs.has_eventfd(IrqKind::Msix, v)));
    let mut content = [0xffu8; 8];
    f.read_exact_at(&mut content, 0).unwrap();
    assert_eq!(
        content, [0; 8],
        "nothing signalled the memfd as if an eventfd"
    );
    c.assert_alive();
}

#[test]
fn set_irqs_mask_with_an_eventfd_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let e = eventfd();
    for index in [irq::INTX, irq::MSIX] {
        c.call_fds(
            cmd::DEVICE_SET_IRQS,
            &set_irqs(irq::DATA_EVENTFD | irq::ACTION_MASK, index, 0, 1, &[]),
            &[e.as_raw_fd()],
        )
        .errno(EINVAL);
    }
    c.assert_alive();
}

#[test]
fn set_irqs_intx_unmask_eventfd_unmasks_the_automasked_line() {
    let h = Harness::start();
    let mut c = h.client();
    let (trigger, unmask) = (eventfd(), eventfd());
    c.set_irq_fds(irq::ACTION_TRIGGER, irq::INTX, 0, &[&trigger]);
    c.set_irq_fds(irq::ACTION_UNMASK, irq::INTX, 0, &[&unmask]);
    h.irqs.set_intx_level(true);
    assert_eq!(wait_fired(&trigger, 1000), 1);
    assert!(h.irqs.masked(IrqKind::Intx, 0), "automasked");
    h.irqs.set_intx_level(true);
    assert_eq!(fired(&trigger), 0, "masked: no second interrupt");
    // The client's unmask eventfd (a resampler) unmasks; the level is still high.
    unmask.write(1).unwrap();
    assert_eq!(wait_fired(&trigger, 2000), 1);
    assert!(h.irqs.masked(IrqKind::Intx, 0), "automasked again");
    // Level low: unmasking is quiet.
    h.irqs.set_intx_level(false);
    unmask.write(1).unwrap();
    assert!(wait_until(|| !h.irqs.masked(IrqKind::Intx, 0)));
    assert_eq!(wait_fired(&trigger, 100), 0);
    // De-assigned, the unmask eventfd is no longer watched.
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(irq::DATA_EVENTFD | irq::ACTION_UNMASK, irq::INTX, 0, 1, &[]),
    )
    .ok();
    assert!(h.irqs.unmask_fds().is_empty());
    h.irqs.set_intx_level(true);
    assert_eq!(wait_fired(&trigger, 1000), 1);
    unmask.write(1).unwrap();
    assert_eq!(wait_fired(&trigger, 200), 0);
    assert!(h.irqs.masked(IrqKind::Intx, 0));
    c.assert_alive();
}

#[test]
fn set_irqs_unmask_eventfd_on_msix_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let e = eventfd();
    c.call_fds(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(irq::DATA_EVENTFD | irq::ACTION_UNMASK, irq::MSIX, 0, 1, &[]),
        &[e.as_raw_fd()],
    )
    .errno(EINVAL);
    assert!(h.irqs.unmask_fds().is_empty());
    c.assert_alive();
}

#[test]
fn set_irqs_data_bool_with_too_few_bytes_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let fds = msix_fds(&mut c);
    c.call(
        cmd::DEVICE_SET_IRQS,
        &set_irqs(
            irq::DATA_BOOL | irq::ACTION_TRIGGER,
            irq::MSIX,
            0,
            4,
            &[1, 1],
        ),
    )
    .errno(EINVAL);
    assert_eq!(fired_all(&fds), [0; 4]);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// REGION_READ / REGION_WRITE

#[test]
fn region_read_of_config_space() {
    let h = Harness::start();
    let mut c = h.client();
    let id = c.read_region(region::CONFIG, 0, 4);
    assert_eq!(u16_at(&id, 0), VENDOR_ID);
    assert_eq!(u16_at(&id, 2), DEVICE_ID);
    let all = c.read_region(region::CONFIG, 0, CONFIG_SIZE as u32);
    assert_eq!(&all[..4], &id[..]);
    c.assert_alive();
}

#[test]
fn region_write_to_bar1_reads_back() {
    let h = Harness::start();
    let mut c = h.client();
    c.write_region(region::BAR1, 0x10, &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(
        c.read_region(region::BAR1, 0x10, 4),
        [0xde, 0xad, 0xbe, 0xef]
    );
    assert_eq!(c.read_region(region::BAR1, 0x12, 1), [0xbe]);
    assert_eq!(
        h.record.lock().unwrap().writes,
        vec![(PciRegion::Bar(1), 0x10, vec![0xde, 0xad, 0xbe, 0xef])]
    );
    // Trapped accesses to BAR0 reach the device's memory.
    c.write_region(region::BAR0, 0x10, &[1, 2, 3]);
    let mut got = [0u8; 3];
    h.mem.read_exact_at(&mut got, 0x10).unwrap();
    assert_eq!(got, [1, 2, 3]);
    c.assert_alive();
}

#[test]
fn region_access_past_the_end_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let cases = [
        (region::BAR1, BAR1_SIZE - 4, 8),
        (region::BAR1, BAR1_SIZE, 1),
        (region::CONFIG, CONFIG_SIZE - 1, 2),
        (region::BAR0, BAR0_SIZE, 1),
        (region::BAR1, u64::MAX, 2),
    ];
    for (r, offset, count) in cases {
        c.call(cmd::REGION_READ, &region_rw(r, offset, count, &[]))
            .errno(EINVAL);
        let data = vec![0x77; count as usize];
        c.call(cmd::REGION_WRITE, &region_rw(r, offset, count, &data))
            .errno(EINVAL);
    }
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn region_index_out_of_range_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for r in [9u32, 100, u32::MAX] {
        c.call(cmd::REGION_READ, &region_rw(r, 0, 4, &[]))
            .errno(EINVAL);
        c.call(cmd::REGION_WRITE, &region_rw(r, 0, 1, &[1]))
            .errno(EINVAL);
    }
    c.assert_alive();
}

#[test]
fn access_to_an_absent_region_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for r in [region::ROM, region::VGA, 3, 4, 5] {
        c.call(cmd::REGION_READ, &region_rw(r, 0, 4, &[]))
            .errno(EINVAL);
        c.call(cmd::REGION_WRITE, &region_rw(r, 0, 1, &[1]))
            .errno(EINVAL);
    }
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

/// REGION_READ's request is 32 bytes whatever its count, and a REGION_WRITE with
/// `count = max + 1` is still below the message limit (`max + 4096`), so both reach the
/// handler, whose `max_data_xfer_size` check answers `E2BIG` before the range check.
#[test]
fn region_count_over_max_data_xfer_size_is_e2big() {
    let max = 65536u32;
    let h = Harness::with(opts_with(ServerConfig {
        max_data_xfer_size: max,
        ..config()
    }));
    let mut c = h.client();
    c.call(cmd::REGION_READ, &region_rw(region::BAR1, 0, max + 1, &[]))
        .errno(libc::E2BIG);
    let data = vec![1u8; max as usize + 1];
    c.call(
        cmd::REGION_WRITE,
        &region_rw(region::BAR1, 0, max + 1, &data),
    )
    .errno(libc::E2BIG);
    // At the limit, the range check decides (BAR1 is only 256 bytes).
    c.call(cmd::REGION_READ, &region_rw(region::BAR1, 0, max, &[]))
        .errno(EINVAL);
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn region_write_with_count_different_from_the_data_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(
        cmd::REGION_WRITE,
        &region_rw(region::BAR1, 0, 4, &[1, 2, 3]),
    )
    .errno(EINVAL);
    c.call(
        cmd::REGION_WRITE,
        &region_rw(region::BAR1, 0, 2, &[1, 2, 3, 4]),
    )
    .errno(EINVAL);
    c.call(cmd::REGION_WRITE, &region_rw(region::BAR1, 0, 1, &[]))
        .errno(EINVAL);
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn region_read_with_trailing_bytes_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(
        cmd::REGION_READ,
        &region_rw(region::CONFIG, 0, 4, &[0, 0, 0, 0]),
    )
    .errno(EINVAL);
    c.call(cmd::REGION_READ, &region_rw(region::CONFIG, 0, 4, &[0]))
        .errno(EINVAL);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// REGION_WRITE_MULTI

fn multi_entry(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let mut d = [0u8; 8];
    d[..data.len()].copy_from_slice(data);
    P::new().u64(offset).u32(region).u32(count).bytes(&d).done()
}

fn write_multi(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut p = P::new().u64(entries.len() as u64).done();
    for e in entries {
        p.extend_from_slice(e);
    }
    p
}

#[test]
fn region_write_multi_applies_entries_in_order() {
    let h = Harness::start();
    let mut c = h.client();
    let entries = [
        multi_entry(region::BAR1, 0, 4, &[1, 2, 3, 4]),
        multi_entry(region::BAR1, 0, 2, &[9, 9]),
        multi_entry(region::CONFIG, 0x40, 1, &[0x77]),
        multi_entry(region::BAR1, 8, 8, &[1, 2, 3, 4, 5, 6, 7, 8]),
    ];
    let r = c.call(cmd::REGION_WRITE_MULTI, &write_multi(&entries));
    let p = r.ok();
    assert_eq!(p.len(), 8);
    assert_eq!(u64_at(p, 0), 4, "wr_cnt");
    assert_eq!(
        c.read_region(region::BAR1, 0, 16),
        [9, 9, 3, 4, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(c.read_region(region::CONFIG, 0x40, 1), [0x77]);
    let order: Vec<(PciRegion, u64, usize)> = h
        .record
        .lock()
        .unwrap()
        .writes
        .iter()
        .map(|(r, o, d)| (*r, *o, d.len()))
        .collect();
    assert_eq!(
        order,
        [
            (PciRegion::Bar(1), 0, 4),
            (PciRegion::Bar(1), 0, 2),
            (PciRegion::Config, 0x40, 1),
            (PciRegion::Bar(1), 8, 8),
        ]
    );
    // 200 entries are allowed.
    let many: Vec<_> = (0..200)
        .map(|i| multi_entry(region::BAR1, i % 0x100, 1, &[i as u8]))
        .collect();
    let r = c.call(cmd::REGION_WRITE_MULTI, &write_multi(&many));
    assert_eq!(u64_at(r.ok(), 0), 200);
    c.assert_alive();
}

#[test]
fn region_write_multi_with_more_than_200_entries_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let many: Vec<_> = (0..201)
        .map(|i| multi_entry(region::BAR1, i % 0x100, 1, &[1]))
        .collect();
    c.call(cmd::REGION_WRITE_MULTI, &write_multi(&many))
        .errno(EINVAL);
    // Only the count says 201.
    let mut p = write_multi(&many[..1]);
    p[..8].copy_from_slice(&201u64.to_le_bytes());
    c.call(cmd::REGION_WRITE_MULTI, &p).errno(EINVAL);
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn region_write_multi_entry_with_count_over_8_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let entries = [
        multi_entry(region::BAR1, 0, 1, &[1]),
        multi_entry(region::BAR1, 8, 9, &[2; 8]),
    ];
    c.call(cmd::REGION_WRITE_MULTI, &write_multi(&entries))
        .errno(EINVAL);
    assert!(
        h.record.lock().unwrap().writes.is_empty(),
        "the whole message is parsed before any write is applied"
    );
    c.assert_alive();
}

#[test]
fn region_write_multi_stops_at_the_first_failing_entry() {
    let h = Harness::start();
    let mut c = h.client();
    let entries = [
        multi_entry(region::BAR1, 0, 1, &[1]),
        multi_entry(region::ROM, 0, 1, &[2]),
        multi_entry(region::BAR1, 1, 1, &[3]),
    ];
    c.call(cmd::REGION_WRITE_MULTI, &write_multi(&entries))
        .errno(EINVAL);
    assert_eq!(c.read_region(region::BAR1, 0, 2), [1, 0]);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DMA_READ / DMA_WRITE sent by the server

/// Client memory behind maps without an fd, and a log of the requests served.
struct ClientMem {
    base: u64,
    bytes: Vec<u8>,
    layout: DmaRwLayout,
    /// (command, address, count) of every request, in order.
    log: Vec<(u16, u64, u64)>,
    /// Answer requests with this errno instead of data.
    fail: Option<u32>,
}

impl ClientMem {
    fn new(base: u64, len: usize, layout: DmaRwLayout) -> Self {
        ClientMem {
            base,
            bytes: (0..len)
                .map(|i| ((i * 13) ^ (i >> 8) ^ 0x3c) as u8)
                .collect(),
            layout,
            log: Vec::new(),
            fail: None,
        }
    }

    /// Answer one DMA request from the server, checking its layout byte by byte.
    fn answer(&mut self, c: &Client, m: &Msg) {
        assert!(m.is_command(), "{m:?}");
        assert!(m.fds.is_empty());
        let p = &m.payload;
        let (addr, count, data_at) = match self.layout {
            DmaRwLayout::Qemu => (u64_at(p, 0), u32_at(p, 8) as u64, 12),
            DmaRwLayout::Spec => (u64_at(p, 0), u64_at(p, 8), 16),
        };
        self.log.push((m.command, addr, count));
        // Both layouts make a request 16 + 16 (+ data) bytes long; QEMU's has 4 bytes of
        // tail padding after the data.
        let data_len = if m.command == cmd::DMA_WRITE {
            count
        } else {
            0
        };
        assert_eq!(m.size as u64, 32 + data_len, "request size");
        if let Some(errno) = self.fail {
            let h = header(m.id, m.command, 16, F_REPLY | F_ERROR, errno);
            c.send_bytes(&h, &[]);
            return;
        }
        let off = (addr - self.base) as usize;
        let range = off..off + count as usize;
        let reply = match m.command {
            cmd::DMA_READ => {
                let data = &self.bytes[range];
                match self.layout {
                    DmaRwLayout::Qemu => P::new()
                        .u64(addr)
                        .u32(count as u32)
                        .bytes(data)
                        .u32(0)
                        .done(),
                    DmaRwLayout::Spec => P::new().u64(addr).u64(count).bytes(data).done(),
                }
            }
            cmd::DMA_WRITE => {
                self.bytes[range].copy_from_slice(&p[data_at..data_at + count as usize]);
                match self.layout {
                    // QEMU answers DMA_WRITE with a header-only reply.
                    DmaRwLayout::Qemu => Vec::new(),
                    DmaRwLayout::Spec => P::new().u64(addr).u64(count).done(),
                }
            }
            other => panic!("unexpected command {other} from the server"),
        };
        let mut msg = header(m.id, m.command, 16 + reply.len() as u32, F_REPLY, 0);
        msg.extend_from_slice(&reply);
        c.send_bytes(&msg, &[]);
    }
}

/// Send `command` and serve the server's DMA requests until its reply arrives.
fn call_serving(c: &mut Client, mem: &mut ClientMem, command: u16, payload: &[u8]) -> Msg {
    let id = c.send(command, payload, &[]);
    loop {
        let m = c.recv();
        if m.is_command() {
            mem.answer(c, &m);
            continue;
        }
        assert_eq!((m.id, m.command), (id, command), "{m:?}");
        return m;
    }
}

fn map_no_fd(c: &mut Client, mem: &ClientMem) {
    c.call(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, mem.base, mem.bytes.len() as u64),
    )
    .ok();
}

#[test]
fn device_dma_read_of_a_map_without_fd_uses_dma_read_messages() {
    let h = Harness::start();
    let mut c = h.client();
    let mut mem = ClientMem::new(0x30_0000, 0x2000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    let r = call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x30_0100, 100, DB_OP_READ),
    );
    assert_eq!(r.ok().len(), 16);
    assert_eq!(mem.log, [(cmd::DMA_READ, 0x30_0100, 100)]);
    let rec = h.record.lock().unwrap();
    assert_eq!(rec.dma_in, &mem.bytes[0x100..0x164]);
    assert_eq!(rec.dma_done, [(DB_OP_READ, 0x30_0100, 100)]);
    drop(rec);
    c.assert_alive();
}

#[test]
fn device_dma_write_to_a_map_without_fd_uses_dma_write_messages() {
    let h = Harness::start();
    let mut c = h.client();
    let mut mem = ClientMem::new(0x30_0000, 0x2000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x30_1ff0, 16, DB_OP_WRITE),
    )
    .ok();
    assert_eq!(mem.log, [(cmd::DMA_WRITE, 0x30_1ff0, 16)]);
    let want: Vec<u8> = (0..16).map(dma_pattern).collect();
    assert_eq!(&mem.bytes[0x1ff0..], &want[..]);
    c.assert_alive();
}

#[test]
fn device_dma_is_chunked_by_the_client_max_data_xfer_size() {
    let h = Harness::start();
    let mut c = h.connect();
    c.negotiate_json(r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":4096}}"#);
    let mut mem = ClientMem::new(0x40_0000, 0x4000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x40_0000, 10000, DB_OP_READ),
    )
    .ok();
    assert_eq!(
        mem.log,
        [
            (cmd::DMA_READ, 0x40_0000, 4096),
            (cmd::DMA_READ, 0x40_1000, 4096),
            (cmd::DMA_READ, 0x40_2000, 1808),
        ]
    );
    assert_eq!(h.record.lock().unwrap().dma_in, &mem.bytes[..10000]);
    mem.log.clear();
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x40_0010, 10000, DB_OP_WRITE),
    )
    .ok();
    assert_eq!(
        mem.log,
        [
            (cmd::DMA_WRITE, 0x40_0010, 4096),
            (cmd::DMA_WRITE, 0x40_1010, 4096),
            (cmd::DMA_WRITE, 0x40_2010, 1808),
        ]
    );
    let want: Vec<u8> = (0..10000).map(dma_pattern).collect();
    assert_eq!(&mem.bytes[0x10..0x10 + 10000], &want[..]);
    c.assert_alive();
}

/// A DMA_READ reply carries `count` bytes to the server, so the server must not ask for
/// more than its own `max_data_xfer_size` either, even when the client allows more:
/// otherwise the reply exceeds the server's message limit.
#[test]
fn device_dma_is_chunked_by_the_server_max_data_xfer_size_too() {
    let h = Harness::with(opts_with(ServerConfig {
        max_data_xfer_size: 4096,
        ..config()
    }));
    let mut c = h.client();
    let mut mem = ClientMem::new(0x40_0000, 0x4000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x40_0000, 10000, DB_OP_READ),
    )
    .ok();
    assert_eq!(
        mem.log,
        [
            (cmd::DMA_READ, 0x40_0000, 4096),
            (cmd::DMA_READ, 0x40_1000, 4096),
            (cmd::DMA_READ, 0x40_2000, 1808),
        ]
    );
    assert_eq!(h.record.lock().unwrap().dma_in, &mem.bytes[..10000]);
    c.assert_alive();
}

/// A client that disconnects instead of answering a DMA request: the device access
/// fails, the session is torn down, and the next client is served.
#[test]
fn a_client_that_leaves_during_a_dma_request_is_torn_down() {
    let h = Harness::start();
    let mut c = h.client();
    let mem = ClientMem::new(0x30_0000, 0x1000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    c.send(cmd::REGION_WRITE, &doorbell(0x30_0000, 8, DB_OP_READ), &[]);
    let req = c.recv();
    assert_eq!(req.command, cmd::DMA_READ);
    drop(c);
    assert!(wait_until(
        || h.dma.is_empty() && h.record.lock().unwrap().detached == 1
    ));
    assert_eq!(h.record.lock().unwrap().dma_errors.len(), 1);
    h.client().assert_alive();
}

/// A client that never answers a DMA request is dropped after the io timeout.
#[test]
fn a_client_that_never_answers_a_dma_request_is_dropped_after_the_io_timeout() {
    let h = Harness::with(opts_with(ServerConfig {
        io_timeout: Duration::from_millis(300),
        ..config()
    }));
    let mut c = h.client();
    let mem = ClientMem::new(0x30_0000, 0x1000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    c.send(cmd::REGION_WRITE, &doorbell(0x30_0000, 8, DB_OP_WRITE), &[]);
    assert_eq!(c.recv().command, cmd::DMA_WRITE);
    assert!(c.closed_by_server());
    assert!(wait_until(|| h.dma.is_empty()));
    assert_eq!(h.record.lock().unwrap().dma_errors.len(), 1);
    h.client().assert_alive();
}

#[test]
fn device_dma_with_the_spec_layout() {
    let h = Harness::with(opts_with(ServerConfig {
        dma_rw_layout: DmaRwLayout::Spec,
        ..config()
    }));
    let mut c = h.client();
    let mut mem = ClientMem::new(0x50_0000, 0x1000, DmaRwLayout::Spec);
    map_no_fd(&mut c, &mem);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x50_0020, 40, DB_OP_READ),
    )
    .ok();
    assert_eq!(h.record.lock().unwrap().dma_in, &mem.bytes[0x20..0x48]);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x50_0800, 40, DB_OP_WRITE),
    )
    .ok();
    let want: Vec<u8> = (0..40).map(dma_pattern).collect();
    assert_eq!(&mem.bytes[0x800..0x828], &want[..]);
    assert_eq!(
        mem.log,
        [
            (cmd::DMA_READ, 0x50_0020, 40),
            (cmd::DMA_WRITE, 0x50_0800, 40)
        ]
    );
    c.assert_alive();
}

/// A failed DMA_READ/DMA_WRITE reaches the device as an error carrying the client's
/// errno; the test device then fails the doorbell write with `EIO`
/// (`AccessError::Device`).
#[test]
fn a_dma_error_reply_from_the_client_fails_the_device_access() {
    let h = Harness::start();
    let mut c = h.client();
    let mut mem = ClientMem::new(0x30_0000, 0x1000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    mem.fail = Some(libc::EFAULT as u32);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x30_0000, 8, DB_OP_READ),
    )
    .errno(libc::EIO);
    mem.fail = Some(libc::EPERM as u32);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x30_0000, 8, DB_OP_WRITE),
    )
    .errno(libc::EIO);
    // An error reply without an errno counts as EIO.
    mem.fail = Some(0);
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x30_0000, 8, DB_OP_READ),
    )
    .errno(libc::EIO);
    let rec = h.record.lock().unwrap();
    assert_eq!(rec.dma_errors, [libc::EFAULT, libc::EPERM, libc::EIO]);
    assert!(rec.dma_done.is_empty() && rec.dma_in.is_empty());
    drop(rec);
    // A DMA to an address nothing maps never reaches the client.
    mem.fail = None;
    mem.log.clear();
    call_serving(
        &mut c,
        &mut mem,
        cmd::REGION_WRITE,
        &doorbell(0x90_0000, 8, DB_OP_READ),
    )
    .errno(libc::EIO);
    assert!(mem.log.is_empty());
    assert_eq!(h.record.lock().unwrap().dma_errors[3], libc::EFAULT);
    c.assert_alive();
}

#[test]
fn commands_sent_while_a_dma_request_is_pending_are_parked_and_answered_in_order() {
    let h = Harness::start();
    let mut c = h.client();
    let mut mem = ClientMem::new(0x30_0000, 0x1000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    let w = c.send(cmd::REGION_WRITE, &doorbell(0x30_0040, 16, DB_OP_READ), &[]);
    let req = c.recv();
    assert!(req.is_command() && req.command == cmd::DMA_READ, "{req:?}");
    // Before answering: a query, a posted write, and a read that must see the write.
    let g = c.send(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0), &[]);
    c.post(
        cmd::REGION_WRITE,
        &region_rw(region::BAR1, 0x20, 2, &[7, 8]),
    );
    let rd = c.send(
        cmd::REGION_READ,
        &region_rw(region::BAR1, 0x20, 2, &[]),
        &[],
    );
    mem.answer(&c, &req);
    c.reply(w, cmd::REGION_WRITE).ok();
    let info = c.reply(g, cmd::DEVICE_GET_INFO);
    let p = info.ok();
    assert_eq!((u32_at(p, 0), u32_at(p, 8), u32_at(p, 12)), (16, 9, 5));
    let r = c.reply(rd, cmd::REGION_READ);
    assert_eq!(&r.ok()[16..], [7, 8]);
    assert_eq!(h.record.lock().unwrap().dma_in, &mem.bytes[0x40..0x50]);
    c.assert_alive();
}

/// A DMA_MAP parked behind a DMA request is published to the device's memory snapshot
/// (what vring workers read) once handled, like any other map.
#[test]
fn a_dma_map_parked_during_a_dma_request_reaches_the_snapshot() {
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
    let h = Harness::start();
    let mut c = h.client();
    let mut mem = ClientMem::new(0x30_0000, 0x1000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    let w = c.send(cmd::REGION_WRITE, &doorbell(0x30_0000, 8, DB_OP_READ), &[]);
    let req = c.recv();
    assert_eq!(req.command, cmd::DMA_READ);
    let ram = memfd("ram", 0x1000);
    let m = c.send(
        cmd::DMA_MAP,
        &dma_map(R | W, 0, 0x10_0000, 0x1000),
        &[ram.as_raw_fd()],
    );
    mem.answer(&c, &req);
    c.reply(w, cmd::REGION_WRITE).ok();
    c.reply(m, cmd::DMA_MAP).ok();
    let snapshot = h.dma.snapshot();
    assert!(
        wait_until(|| snapshot.memory().num_regions() == 1),
        "parked map never published"
    );
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// DEVICE_RESET

#[test]
fn device_reset_resets_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    c.write_region(region::BAR1, 0x10, &[0xff; 4]);
    let r = c.call(cmd::DEVICE_RESET, &[]);
    assert!(r.ok().is_empty());
    assert_eq!(r.size, 16);
    assert_eq!(h.record.lock().unwrap().resets, 1);
    assert_eq!(c.read_region(region::BAR1, 0x10, 4), [0; 4]);
    c.call(cmd::DEVICE_RESET, &[0, 0, 0, 0]).errno(EINVAL);
    assert_eq!(h.record.lock().unwrap().resets, 1);
    c.assert_alive();
}

#[test]
fn device_reset_of_a_device_without_reset_is_enotsup() {
    let h = Harness::with(Opts {
        can_reset: false,
        ..Opts::default()
    });
    let mut c = h.client();
    c.write_region(region::BAR1, 0x10, &[0xff]);
    c.call(cmd::DEVICE_RESET, &[]).errno(libc::ENOTSUP);
    assert_eq!(h.record.lock().unwrap().resets, 0);
    assert_eq!(c.read_region(region::BAR1, 0x10, 1), [0xff]);
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// Unsupported and wrong-direction commands

#[test]
fn unsupported_commands_are_enotsup_and_server_to_client_commands_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for command in [
        cmd::DIRTY_PAGES,
        cmd::DEVICE_FEATURE,
        cmd::MIG_DATA_READ,
        cmd::MIG_DATA_WRITE,
    ] {
        c.call(command, &four_u32(16, 0, 0, 0)).errno(libc::ENOTSUP);
    }
    // Probing the migration feature (what QEMU does) is refused the same way.
    c.call(
        cmd::DEVICE_FEATURE,
        &P::new().u32(8).u32(1 | 1 << 18).done(),
    )
    .errno(libc::ENOTSUP);
    for command in [cmd::DMA_READ, cmd::DMA_WRITE] {
        c.call(command, &P::new().u64(0x1000).u64(4).done())
            .errno(EINVAL);
    }
    c.assert_alive();
}

// ---------------------------------------------------------------------------------------
// One client at a time

#[test]
fn a_second_client_is_refused_while_one_is_attached() {
    let h = Harness::start();
    let mut first = h.client();
    first.write_region(region::BAR1, 0, &[1]);
    let second = h.connect();
    assert!(second.closed_by_server(), "second client kept");
    first.assert_alive();
    assert_eq!(first.read_region(region::BAR1, 0, 1), [1]);
}

#[test]
fn stopping_the_server_closes_the_attached_session() {
    let mut h = Harness::start();
    let mut c = h.client();
    c.call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x10000, 0x1000))
        .ok();
    h.stop();
    assert!(c.closed_by_server());
    assert!(h.dma.is_empty());
    assert_eq!(h.record.lock().unwrap().detached, 1);
}

#[test]
fn a_reconnecting_client_finds_the_device_state_but_no_maps_or_irqs() {
    let h = Harness::start();
    let mut first = h.client();
    first.write_region(region::BAR1, 0x30, &[0xef, 0xbe, 0xad, 0xde]);
    first
        .call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x10000, 0x1000))
        .ok();
    let e = eventfd();
    first.set_irq_fds(irq::ACTION_TRIGGER, irq::MSIX, 0, &[&e]);
    drop(first);
    let mut second = h.client();
    assert_eq!(
        second.read_region(region::BAR1, 0x30, 4),
        [0xef, 0xbe, 0xad, 0xde]
    );
    assert!(h.dma.is_empty());
    assert!(!h.irqs.has_eventfd(IrqKind::Msix, 0));
    assert_eq!(h.record.lock().unwrap().detached, 1);
    // The old map is gone: mapping the same range again succeeds.
    second
        .call(cmd::DMA_MAP, &dma_map(R | W, 0, 0x10000, 0x1000))
        .ok();
    second.assert_alive();
}
