//! vfio-user protocol tests of client memory (vfio-user.rst, "VFIO_USER_DMA_MAP",
//! "VFIO_USER_DMA_UNMAP", "VFIO_USER_DMA_READ", "VFIO_USER_DMA_WRITE"): maps with and
//! without an fd, every way a map or unmap is refused, and the DMA_READ/DMA_WRITE
//! messages the server sends for maps without an fd (both layouts, chunking, error
//! replies, clients that leave or stall, commands parked meanwhile). Raw Unix socket
//! against an in-process `VfioUserServer`; every error reply's errno is asserted, then
//! that the server still serves.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::device::*;
use common::*;
use unidev_core::memory::Prot;
use unidev_transports::vfio_user::{DmaRwLayout, ServerConfig};

/// The test device's doorbell registers: iova u64, len u32, op u32.
fn doorbell_data(iova: u64, len: u32, op: u32) -> Vec<u8> {
    LeBytes::new().u64(iova).u32(len).u32(op).done()
}

/// A REGION_WRITE of the doorbell: BAR1 at DOORBELL, iova/len/op.
fn doorbell(iova: u64, len: u32, op: u32) -> Request {
    Request::region_write(region::BAR1, DOORBELL, &doorbell_data(iova, len, op))
}

#[test]
fn dma_map_with_a_memfd_is_mmapped_and_reachable_by_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("guest-ram", 0x4000);
    let init: Vec<u8> = (0..0x4000u32).map(|i| ((i * 3) ^ (i >> 8)) as u8).collect();
    f.write_all_at(&init, 0).unwrap();
    let r = c.call(Request::dma_map(dma::RW, 0x1000, 0x10_0000, 0x2000).fds(&[f.as_raw_fd()]));
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
        &doorbell_data(0x10_0010, 64, DB_OP_READ),
    );
    assert_eq!(h.record.lock().unwrap().dma_in, &init[0x1010..0x1050]);
    c.write_region(
        region::BAR1,
        DOORBELL,
        &doorbell_data(0x10_1ff0, 16, DB_OP_WRITE),
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
        .call(Request::dma_map(dma::RW, 0, 0x20_0000, 0x1000))
        .ok()
        .is_empty());
    c.call(Request::dma_map(dma::READ, 0, 0x20_1000, 0x1000))
        .ok();
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
    c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x2000)).ok();
    for (addr, size) in [
        (0x10000, 0x2000),
        (0xf000, 0x2000),
        (0x11000, 0x1000),
        (0, 0x100000),
    ] {
        c.call(Request::dma_map(dma::RW, 0, addr, size))
            .errno(libc::EEXIST);
    }
    // Adjacent is fine.
    c.call(Request::dma_map(dma::RW, 0, 0x12000, 0x1000)).ok();
    c.call(Request::dma_map(dma::RW, 0, 0xf000, 0x1000)).ok();
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
        c.call(Request::dma_map(dma::RW, offset, addr, size).fds(&[f.as_raw_fd()]))
            .errno(EINVAL);
        c.call(Request::dma_map(dma::RW, offset, addr, size))
            .errno(EINVAL);
    }
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_map_with_bad_flags_or_size_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for flags in [4, dma::RW | 0x100, 0x8000_0000] {
        c.call(Request::dma_map(flags, 0, 0x10000, 0x1000))
            .errno(EINVAL);
    }
    // Neither readable nor writable; zero size; wrapping range; argsz too small.
    c.call(Request::dma_map(0, 0, 0x10000, 0x1000))
        .errno(EINVAL);
    c.call(Request::dma_map(dma::READ, 0, 0x10000, 0))
        .errno(EINVAL);
    c.call(Request::dma_map(
        dma::READ,
        0,
        0xffff_ffff_ffff_f000,
        0x2000,
    ))
    .errno(EINVAL);
    c.call(Request::dma_map(dma::READ, 0, 0x10000, 0x1000).argsz(31))
        .errno(EINVAL);
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_map_with_an_fd_smaller_than_the_range_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("small", 0x2000);
    for (offset, size) in [(0x1000, 0x2000), (0, 0x3000), (0x2000, 0x1000)] {
        c.call(Request::dma_map(dma::RW, offset, 0x10000, size).fds(&[f.as_raw_fd()]))
            .errno(EINVAL);
    }
    assert!(h.dma.is_empty());
    c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x2000).fds(&[f.as_raw_fd()]))
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
        c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x1000).fds(&[fd]))
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
    c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x1000).fds(&[a.as_raw_fd(), b.as_raw_fd()]))
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
        c.call(Request::dma_map(dma::RW, 0, i * 0x10000, 0x1000))
            .ok();
    }
    c.call(Request::dma_map(dma::RW, 0, 0x100000, 0x1000))
        .errno(libc::ENOSPC);
    assert_eq!(h.dma.len(), 3);
    c.call(Request::dma_unmap(0, 0x10000, 0x1000)).ok();
    c.call(Request::dma_map(dma::RW, 0, 0x100000, 0x1000)).ok();
    assert_eq!(h.dma.len(), 3);
    c.assert_alive();
}

#[test]
fn dma_unmap_of_an_exact_map_echoes_the_entry() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("ram", 0x3000);
    c.call(Request::dma_map(dma::RW, 0, 0x40000, 0x3000).fds(&[f.as_raw_fd()]))
        .ok();
    c.call(Request::dma_map(dma::READ, 0, 0x80000, 0x1000)).ok();
    let r = c.call(Request::dma_unmap(0, 0x40000, 0x3000));
    let p = r.ok();
    assert_eq!(p.len(), 24);
    assert_eq!(dma_unmap_reply(p), (24, 0, 0x40000, 0x3000));
    assert_eq!(h.dma.len(), 1);
    assert!(h.dma.find(0x40000).is_none());
    c.call(Request::dma_unmap(0, 0x80000, 0x1000)).ok();
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn dma_unmap_that_matches_no_map_is_enoent() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(Request::dma_map(dma::RW, 0, 0x40000, 0x3000)).ok();
    for (addr, size) in [
        (0x40000, 0x1000),
        (0x41000, 0x2000),
        (0x40000, 0x4000),
        (0x80000, 0x3000),
    ] {
        c.call(Request::dma_unmap(0, addr, size))
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
    c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x1000).fds(&[f.as_raw_fd()]))
        .ok();
    c.call(Request::dma_map(dma::RW, 0, 0x20000, 0x1000)).ok();
    c.call(Request::dma_map(dma::READ, 0, 0x30000, 0x1000)).ok();
    assert_eq!(h.dma.len(), 3);
    let r = c.call(Request::dma_unmap(2, 0, 0));
    let p = r.ok();
    assert_eq!(p.len(), 24);
    assert_eq!(u32_at(p, 4), 2);
    assert_eq!(h.dma.len(), 0);
    // Unmap-all with nothing mapped is fine too.
    c.call(Request::dma_unmap(2, 0, 0)).ok();
    c.assert_alive();
}

#[test]
fn dma_unmap_all_with_an_address_or_size_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(Request::dma_map(dma::RW, 0, 0x40000, 0x1000)).ok();
    c.call(Request::dma_unmap(2, 0x40000, 0x1000)).errno(EINVAL);
    c.call(Request::dma_unmap(2, 0x40000, 0)).errno(EINVAL);
    c.call(Request::dma_unmap(2, 0, 0x1000)).errno(EINVAL);
    assert_eq!(h.dma.len(), 1);
    c.assert_alive();
}

#[test]
fn dma_unmap_with_dirty_bitmap_is_enotsup_and_other_flags_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(Request::dma_map(dma::RW, 0, 0x40000, 0x1000)).ok();
    c.call(Request::dma_unmap(1, 0x40000, 0x1000))
        .errno(libc::ENOTSUP);
    c.call(Request::dma_unmap(4, 0x40000, 0x1000)).errno(EINVAL);
    c.call(Request::dma_unmap(0, 0x40000, 0x1000).argsz(16))
        .errno(EINVAL);
    assert_eq!(h.dma.len(), 1);
    c.assert_alive();
}

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
            c.send_reply(&Request::error_reply_to(m, errno));
            return;
        }
        let off = (addr - self.base) as usize;
        let range = off..off + count as usize;
        let reply = Request::reply_to(m);
        let reply = match m.command {
            cmd::DMA_READ => {
                let data = &self.bytes[range];
                match self.layout {
                    DmaRwLayout::Qemu => reply.u64(addr).u32(count as u32).bytes(data).u32(0),
                    DmaRwLayout::Spec => reply.u64(addr).u64(count).bytes(data),
                }
            }
            cmd::DMA_WRITE => {
                self.bytes[range].copy_from_slice(&p[data_at..data_at + count as usize]);
                match self.layout {
                    // QEMU answers DMA_WRITE with a header-only reply.
                    DmaRwLayout::Qemu => reply,
                    DmaRwLayout::Spec => reply.u64(addr).u64(count),
                }
            }
            other => panic!("unexpected command {other} from the server"),
        };
        c.send_reply(&reply);
    }
}

/// Send `req` and serve the server's DMA requests until its reply arrives.
fn call_serving(c: &mut Client, mem: &mut ClientMem, req: Request) -> Msg {
    let command = req.command;
    let id = c.send(req);
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
    c.call(Request::dma_map(
        dma::RW,
        0,
        mem.base,
        mem.bytes.len() as u64,
    ))
    .ok();
}

#[test]
fn device_dma_read_of_a_map_without_fd_uses_dma_read_messages() {
    let h = Harness::start();
    let mut c = h.client();
    let mut mem = ClientMem::new(0x30_0000, 0x2000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    let r = call_serving(&mut c, &mut mem, doorbell(0x30_0100, 100, DB_OP_READ));
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
    call_serving(&mut c, &mut mem, doorbell(0x30_1ff0, 16, DB_OP_WRITE)).ok();
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
    call_serving(&mut c, &mut mem, doorbell(0x40_0000, 10000, DB_OP_READ)).ok();
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
    call_serving(&mut c, &mut mem, doorbell(0x40_0010, 10000, DB_OP_WRITE)).ok();
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
    let h = Harness::with(Opts::with_config(ServerConfig {
        max_data_xfer_size: 4096,
        ..config()
    }));
    let mut c = h.client();
    let mut mem = ClientMem::new(0x40_0000, 0x4000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    call_serving(&mut c, &mut mem, doorbell(0x40_0000, 10000, DB_OP_READ)).ok();
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
    c.send(doorbell(0x30_0000, 8, DB_OP_READ));
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
    let h = Harness::with(Opts::with_config(ServerConfig {
        io_timeout: Duration::from_millis(300),
        ..config()
    }));
    let mut c = h.client();
    let mem = ClientMem::new(0x30_0000, 0x1000, DmaRwLayout::Qemu);
    map_no_fd(&mut c, &mem);
    c.send(doorbell(0x30_0000, 8, DB_OP_WRITE));
    assert_eq!(c.recv().command, cmd::DMA_WRITE);
    assert!(c.closed_by_server());
    assert!(wait_until(|| h.dma.is_empty()));
    assert_eq!(h.record.lock().unwrap().dma_errors.len(), 1);
    h.client().assert_alive();
}

#[test]
fn device_dma_with_the_spec_layout() {
    let h = Harness::with(Opts::with_config(ServerConfig {
        dma_rw_layout: DmaRwLayout::Spec,
        ..config()
    }));
    let mut c = h.client();
    let mut mem = ClientMem::new(0x50_0000, 0x1000, DmaRwLayout::Spec);
    map_no_fd(&mut c, &mem);
    call_serving(&mut c, &mut mem, doorbell(0x50_0020, 40, DB_OP_READ)).ok();
    assert_eq!(h.record.lock().unwrap().dma_in, &mem.bytes[0x20..0x48]);
    call_serving(&mut c, &mut mem, doorbell(0x50_0800, 40, DB_OP_WRITE)).ok();
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
    call_serving(&mut c, &mut mem, doorbell(0x30_0000, 8, DB_OP_READ)).errno(libc::EIO);
    mem.fail = Some(libc::EPERM as u32);
    call_serving(&mut c, &mut mem, doorbell(0x30_0000, 8, DB_OP_WRITE)).errno(libc::EIO);
    // An error reply without an errno counts as EIO.
    mem.fail = Some(0);
    call_serving(&mut c, &mut mem, doorbell(0x30_0000, 8, DB_OP_READ)).errno(libc::EIO);
    let rec = h.record.lock().unwrap();
    assert_eq!(rec.dma_errors, [libc::EFAULT, libc::EPERM, libc::EIO]);
    assert!(rec.dma_done.is_empty() && rec.dma_in.is_empty());
    drop(rec);
    // A DMA to an address nothing maps never reaches the client.
    mem.fail = None;
    mem.log.clear();
    call_serving(&mut c, &mut mem, doorbell(0x90_0000, 8, DB_OP_READ)).errno(libc::EIO);
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
    let w = c.send(doorbell(0x30_0040, 16, DB_OP_READ));
    let req = c.recv();
    assert!(req.is_command() && req.command == cmd::DMA_READ, "{req:?}");
    // Before answering: a query, a posted write, and a read that must see the write.
    let g = c.send(Request::device_info(16));
    c.post(Request::region_write(region::BAR1, 0x20, &[7, 8]));
    let rd = c.send(Request::region_read(region::BAR1, 0x20, 2));
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
    let w = c.send(doorbell(0x30_0000, 8, DB_OP_READ));
    let req = c.recv();
    assert_eq!(req.command, cmd::DMA_READ);
    let ram = memfd("ram", 0x1000);
    let m = c.send(Request::dma_map(dma::RW, 0, 0x10_0000, 0x1000).fds(&[ram.as_raw_fd()]));
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
