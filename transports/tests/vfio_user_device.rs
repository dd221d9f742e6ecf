//! vfio-user protocol tests of the device as a whole (vfio-user.rst,
//! "VFIO_USER_DEVICE_GET_INFO", "VFIO_USER_DEVICE_RESET", and the commands unidev
//! refuses: dirty page logging, DEVICE_FEATURE and migration data, and the
//! server-to-client DMA_READ/DMA_WRITE sent the wrong way). Raw Unix socket against an
//! in-process `VfioUserServer`; every error reply's errno is asserted, then that the
//! server still serves.

mod common;

use common::*;

#[test]
fn device_info_reports_pci_reset_9_regions_5_irqs() {
    let h = Harness::start();
    let mut c = h.client();
    for argsz in [16u32, 24, 4096] {
        let r = c.call(Request::device_info(argsz));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(four_u32s(p), (16, 0b11, 9, 5));
    }
    let h2 = Harness::with(Opts {
        can_reset: false,
        ..Opts::default()
    });
    let mut c2 = h2.client();
    let r = c2.call(Request::device_info(16));
    assert_eq!(u32_at(r.ok(), 4), 0b10, "PCI without RESET");
}

#[test]
fn device_info_with_too_small_argsz_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for argsz in [0u32, 8, 15] {
        c.call(Request::device_info(argsz)).errno(EINVAL);
    }
    c.assert_alive();
}

#[test]
fn device_reset_resets_the_device() {
    let h = Harness::start();
    let mut c = h.client();
    c.write_region(region::BAR1, 0x10, &[0xff; 4]);
    let r = c.call(Request::new(cmd::DEVICE_RESET));
    assert!(r.ok().is_empty());
    assert_eq!(r.size, 16);
    assert_eq!(h.record.lock().unwrap().resets, 1);
    assert_eq!(c.read_region(region::BAR1, 0x10, 4), [0; 4]);
    c.call(Request::new(cmd::DEVICE_RESET).bytes(&[0, 0, 0, 0]))
        .errno(EINVAL);
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
    c.call(Request::new(cmd::DEVICE_RESET)).errno(libc::ENOTSUP);
    assert_eq!(h.record.lock().unwrap().resets, 0);
    assert_eq!(c.read_region(region::BAR1, 0x10, 1), [0xff]);
    c.assert_alive();
}

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
        c.call(Request::new(command).u32(16).u32(0).u32(0).u32(0))
            .errno(libc::ENOTSUP);
    }
    // Probing the migration feature (what QEMU does) is refused the same way.
    c.call(Request::new(cmd::DEVICE_FEATURE).u32(8).u32(1 | 1 << 18))
        .errno(libc::ENOTSUP);
    for command in [cmd::DMA_READ, cmd::DMA_WRITE] {
        c.call(Request::new(command).u64(0x1000).u64(4))
            .errno(EINVAL);
    }
    c.assert_alive();
}
