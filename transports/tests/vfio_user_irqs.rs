//! vfio-user protocol tests of interrupts (vfio-user.rst, "VFIO_USER_DEVICE_GET_IRQ_INFO",
//! "VFIO_USER_DEVICE_SET_IRQS"): every irq index, eventfds signalled by the device,
//! ranges, DATA_NONE/DATA_BOOL/DATA_EVENTFD with MASK/UNMASK/TRIGGER, INTx's unmask
//! eventfd, and every way a SET_IRQS is refused (ranges, flag combinations, fd counts
//! and kinds). Raw Unix socket against an in-process `VfioUserServer`; every error
//! reply's errno is asserted, then that the server still serves.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use common::device::*;
use common::*;
use unidev_core::irq::IrqKind;

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
        let r = c.call(Request::irq_info(16, index as u32));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(
            four_u32s(p),
            (16, flags, index as u32, count),
            "irq index {index}"
        );
    }
    c.call(Request::irq_info(16, 5)).errno(EINVAL);
    c.call(Request::irq_info(8, 0)).errno(EINVAL);
    c.assert_alive();
}

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
        c.call(Request::set_irqs(flags, index, start, count, &[]).fds(fds))
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
    c.call(Request::set_irqs(
        irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
        irq::MSIX,
        1,
        2,
        &[],
    ))
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
    c.call(Request::set_irqs(
        irq::DATA_NONE | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        0,
        &[],
    ))
    .ok();
    assert!((0..4).all(|v| !h.irqs.has_eventfd(IrqKind::Msix, v)));
    assert!(
        h.irqs.has_eventfd(IrqKind::Msi, 0),
        "other indices untouched"
    );
    assert!(!h.irqs.signal(IrqKind::Msix, 0));
    assert_eq!(fired_all(&fds), [0; 4]);
    // count 0 means "the whole index" only with start 0 and the TRIGGER action.
    c.call(Request::set_irqs(
        irq::DATA_NONE | irq::ACTION_TRIGGER,
        irq::MSI,
        1,
        0,
        &[],
    ))
    .errno(EINVAL);
    c.call(Request::set_irqs(
        irq::DATA_NONE | irq::ACTION_MASK,
        irq::MSI,
        0,
        0,
        &[],
    ))
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
    c.call(Request::set_irqs(
        b | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        4,
        &[1, 0, 2, 0],
    ))
    .ok();
    assert_eq!(fired_all(&fds), [1, 0, 1, 0]);
    c.call(Request::set_irqs(
        b | irq::ACTION_MASK,
        irq::MSIX,
        0,
        4,
        &[0, 1, 0, 1],
    ))
    .ok();
    let masked: Vec<bool> = (0..4).map(|v| h.irqs.masked(IrqKind::Msix, v)).collect();
    assert_eq!(masked, [false, true, false, true]);
    for v in 0..4 {
        h.irqs.signal(IrqKind::Msix, v);
    }
    assert_eq!(fired_all(&fds), [1, 0, 1, 0]);
    assert!(h.irqs.pending(IrqKind::Msix, 1) && h.irqs.pending(IrqKind::Msix, 3));
    // Unmask line 1 only (start 1, count 3, bools [1, 0, 0]): its pending signal fires.
    c.call(Request::set_irqs(
        b | irq::ACTION_UNMASK,
        irq::MSIX,
        1,
        3,
        &[1, 0, 0],
    ))
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
    c.call(Request::set_irqs(
        none | irq::ACTION_MASK,
        irq::MSIX,
        2,
        1,
        &[],
    ))
    .ok();
    assert!(!h.irqs.signal(IrqKind::Msix, 2));
    assert!(h.irqs.pending(IrqKind::Msix, 2));
    assert_eq!(fired_all(&fds), [0; 4]);
    c.call(Request::set_irqs(
        none | irq::ACTION_UNMASK,
        irq::MSIX,
        2,
        1,
        &[],
    ))
    .ok();
    assert_eq!(fired_all(&fds), [0, 0, 1, 0]);
    assert!(!h.irqs.pending(IrqKind::Msix, 2));
    // Loopback trigger without data.
    c.call(Request::set_irqs(
        none | irq::ACTION_TRIGGER,
        irq::MSIX,
        3,
        1,
        &[],
    ))
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
        c.call(Request::set_irqs(flags, MSIX, 0, 1, &[1]))
            .errno(EINVAL);
    }
    // Unknown index; argsz below the fixed size.
    c.call(Request::set_irqs(DATA_NONE | ACTION_TRIGGER, 5, 0, 1, &[]))
        .errno(EINVAL);
    c.call(Request::set_irqs(DATA_NONE | ACTION_TRIGGER, MSIX, 0, 1, &[]).argsz(19))
        .errno(EINVAL);
    assert_eq!(fired_all(&fds), [0; 4], "nothing was triggered");
    c.assert_alive();
}

#[test]
fn set_irqs_with_fd_count_different_from_count_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    let (a, b) = (eventfd(), eventfd());
    let ev = irq::DATA_EVENTFD | irq::ACTION_TRIGGER;
    c.call(Request::set_irqs(ev, irq::MSIX, 0, 2, &[]).fds(&[a.as_raw_fd()]))
        .errno(EINVAL);
    c.call(Request::set_irqs(ev, irq::MSIX, 0, 1, &[]).fds(&[a.as_raw_fd(), b.as_raw_fd()]))
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
        c.call(Request::set_irqs(ev, irq::MSIX, 0, 1, &[]).fds(&[fd]))
            .errno(EINVAL);
    }
    // One good eventfd and one bad fd: nothing is attached.
    let e = eventfd();
    c.call(Request::set_irqs(ev, irq::MSIX, 0, 2, &[]).fds(&[e.as_raw_fd(), f.as_raw_fd()]))
        .errno(EINVAL);
    // An fd with DATA_NONE.
    c.call(
        Request::set_irqs(irq::DATA_NONE | irq::ACTION_TRIGGER, irq::MSIX, 0, 1, &[])
            .fds(&[e.as_raw_fd()]),
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
        c.call(
            Request::set_irqs(irq::DATA_EVENTFD | irq::ACTION_MASK, index, 0, 1, &[])
                .fds(&[e.as_raw_fd()]),
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
    c.call(Request::set_irqs(
        irq::DATA_EVENTFD | irq::ACTION_UNMASK,
        irq::INTX,
        0,
        1,
        &[],
    ))
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
    c.call(
        Request::set_irqs(irq::DATA_EVENTFD | irq::ACTION_UNMASK, irq::MSIX, 0, 1, &[])
            .fds(&[e.as_raw_fd()]),
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
    c.call(Request::set_irqs(
        irq::DATA_BOOL | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        4,
        &[1, 1],
    ))
    .errno(EINVAL);
    assert_eq!(fired_all(&fds), [0; 4]);
    c.assert_alive();
}
