//! vfio-user protocol tests of the connection as a whole (vfio-user.rst, "Header",
//! "Message sizes", "Socket disconnection behavior"): message IDs and reply types,
//! posted writes, framing errors (header sizes, oversized and truncated messages,
//! unknown commands), fd limits, stalled senders, and what a disconnect, a second
//! client, a stop or a reconnect leaves behind, including an fd-leak check. Raw Unix
//! socket against an in-process `VfioUserServer`; every error reply's errno is
//! asserted, then that the server still serves.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use common::device::*;
use common::*;
use unidev_core::irq::IrqKind;
use unidev_transports::vfio_user::ServerConfig;

#[test]
fn replies_echo_the_message_id_and_set_the_reply_type() {
    let h = Harness::start();
    let mut c = h.client();
    for id in [0u16, 1, 0x7fff, 0xfffe, 0xffff] {
        c.send(Request::device_info(16).id(id));
        let r = c.reply(id, cmd::DEVICE_GET_INFO);
        assert_eq!((r.flags, r.error), (F_REPLY, 0));
        assert_eq!(r.size, 32);
    }
    // Error replies echo the ID as well.
    c.send(Request::region_read(9, 0, 4).id(0xbeef));
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
        c.post(Request::region_write(region::BAR1, 0, &[v, 0, 0, v]));
    }
    // A failing posted write gets no error reply either.
    c.post(Request::region_write(9, 0, &[0x55]));
    c.post(Request::region_write(region::BAR1, 4, &[0xaa]));
    c.post(Request::device_info(16));
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
    let h = Harness::with(Opts::with_config(ServerConfig {
        max_data_xfer_size: max,
        ..config()
    }));
    let mut c = h.client();
    // One byte over the message limit (max_data_xfer_size + 4096).
    let size = max as usize + 4096 + 1;
    let count = size - 32;
    let w = Request::region_write(region::BAR1, 0, &vec![0x11; count]).id(77);
    assert_eq!(16 + w.payload.len(), size);
    c.send(w);
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
            let r = c.call(Request::new(command).bytes(&p));
            assert!(
                r.flags & F_ERROR != 0,
                "command {command} with {short} bytes"
            );
            r.errno(EINVAL);
        }
    }
    // WRITE_MULTI announcing more entries than it carries.
    let p = Request::write_multi(&[multi_entry(region::BAR1, 0, 1, &[])]).patch_u64(0, 2);
    c.call(p).errno(EINVAL);
    assert!(h.dma.is_empty());
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn unknown_commands_are_enosys() {
    let h = Harness::start();
    // Even before VERSION.
    let mut c = h.connect();
    c.call(Request::new(19)).errno(libc::ENOSYS);
    c.negotiate();
    for command in [0u16, 19, 20, 0x100, 0xffff] {
        c.call(Request::new(command).bytes(&[1, 2, 3, 4]))
            .errno(libc::ENOSYS);
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
    c.call(Request::new(99).bytes(&[1, 2, 3, 4]).fds(&raw))
        .errno(EINVAL);
    c.call(Request::new(99).bytes(&[1, 2, 3, 4]).fds(&raw[..16]))
        .errno(libc::ENOSYS);
    let set = Request::set_irqs(
        irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        4,
        &[],
    );
    c.call(set.fds(&raw)).errno(EINVAL);
    assert!((0..4).all(|v| !h.irqs.has_eventfd(IrqKind::Msix, v)));
    // A DMA_MAP with 17 fds is refused before anything is mapped.
    let f = memfd("map", 0x1000);
    let many: Vec<RawFd> = std::iter::repeat_n(f.as_raw_fd(), 17).collect();
    c.call(Request::dma_map(3, 0, 0x10000, 0x1000).fds(&many))
        .errno(EINVAL);
    assert!(h.dma.is_empty());
    c.assert_alive();
}

#[test]
fn fds_on_a_command_that_takes_none_are_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let e = eventfd();
    c.call(Request::device_info(16).fds(&[e.as_raw_fd()]))
        .errno(EINVAL);
    let f = memfd("x", 0x1000);
    c.call(Request::region_write(region::BAR1, 0, &[9]).fds(&[f.as_raw_fd()]))
        .errno(EINVAL);
    assert!(
        h.record.lock().unwrap().writes.is_empty(),
        "refused write applied"
    );
    c.call(Request::dma_unmap(2, 0, 0).fds(&[f.as_raw_fd()]))
        .errno(EINVAL);
    c.assert_alive();
}

#[test]
fn a_stalled_half_message_is_dropped_after_the_io_timeout() {
    let timeout = Duration::from_millis(300);
    let h = Harness::with(Opts::with_config(ServerConfig {
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

#[test]
fn disconnect_drops_all_maps_and_irq_eventfds_but_keeps_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    let f = memfd("ram", 0x2000);
    c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x2000).fds(&[f.as_raw_fd()]))
        .ok();
    c.call(Request::dma_map(dma::RW, 0, 0x20000, 0x1000)).ok();
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
        c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x4000).fds(&[ram.as_raw_fd()]))
            .ok();
        c.call(Request::dma_map(dma::RW, 0, 0x20000, 0x1000)).ok();
        // Refused fds must be closed as well.
        c.call(
            Request::dma_map(dma::RW, 0, 0x30000, 0x1000).fds(&[ram.as_raw_fd(), ram.as_raw_fd()]),
        )
        .errno(EINVAL);
        let many: Vec<RawFd> = std::iter::repeat_n(ram.as_raw_fd(), 17).collect();
        c.call(Request::device_info(16).fds(&many)).errno(EINVAL);
        c.call(Request::device_info(16).fds(&[ram.as_raw_fd()]))
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
            let r = c.call(Request::region_info(256, index));
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
    c.call(Request::dma_map(dma::RW, 0, 0x10000, 0x1000)).ok();
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
        .call(Request::dma_map(dma::RW, 0, 0x10000, 0x1000))
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
        .call(Request::dma_map(dma::RW, 0, 0x10000, 0x1000))
        .ok();
    second.assert_alive();
}
