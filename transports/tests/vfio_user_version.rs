//! vfio-user protocol tests, VERSION (vfio-user.rst, "VFIO_USER_VERSION"): negotiation,
//! the capabilities announced and how they follow the server's config, and every way a
//! VERSION can be refused (twice, another major, bad JSON, truncated), over a raw Unix
//! socket against an in-process `VfioUserServer`, each with the exact errno of the error
//! reply and a check that the server still serves afterwards.

mod common;

use std::os::fd::{AsRawFd, RawFd};

use common::*;
use unidev_core::irq::IrqKind;
use unidev_transports::vfio_user::ServerConfig;

#[test]
fn version_negotiates_and_announces_capabilities() {
    let h = Harness::start();
    let mut c = h.connect();
    let json = br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"twin_socket":{"supported":true}}}"#;
    c.send(Request::version_json(0, 7, json).id(0x4242));
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
    let r = c.call(Request::version(0, 0));
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
    c.call(Request::new(99).fds(&raw)).errno(EINVAL);
    c.call(Request::new(99).fds(&raw[..4])).errno(libc::ENOSYS);
    let set = Request::set_irqs(
        irq::DATA_EVENTFD | irq::ACTION_TRIGGER,
        irq::MSIX,
        0,
        4,
        &[],
    );
    c.call(set.clone().fds(&raw)).errno(EINVAL);
    assert!(!h.irqs.has_eventfd(IrqKind::Msix, 0));
    c.call(set.fds(&raw[..4])).ok();
    assert!(h.irqs.has_eventfd(IrqKind::Msix, 3));
}

#[test]
fn version_without_capabilities_is_accepted() {
    let h = Harness::start();
    let mut c = h.connect();
    let r = c.call(Request::version(0, 1));
    let caps = parse_caps(r.ok());
    assert_eq!(caps["capabilities"]["pgsizes"].as_u64(), Some(4096));
    c.assert_alive();
}

#[test]
fn command_before_version_is_einval() {
    let h = Harness::start();
    let mut c = h.connect();
    c.call(Request::device_info(16)).errno(EINVAL);
    c.call(Request::region_read(region::CONFIG, 0, 4))
        .errno(EINVAL);
    c.call(Request::dma_map(3, 0, 0x10000, 0x1000))
        .errno(EINVAL);
    assert!(h.dma.is_empty());
    c.negotiate();
    c.assert_alive();
}

#[test]
fn version_twice_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(Request::version(0, 0)).errno(EINVAL);
    c.assert_alive();
}

#[test]
fn version_with_another_major_is_enotsup() {
    let h = Harness::start();
    let mut c = h.connect();
    for major in [1u16, 0xffff] {
        c.call(Request::version(major, 0)).errno(libc::ENOTSUP);
    }
    // Still not negotiated, but still served.
    c.call(Request::device_info(16)).errno(EINVAL);
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
        c.call(Request::version_json(0, 0, json)).errno(EINVAL);
    }
    // Truncated: no minor.
    c.call(Request::new(cmd::VERSION).bytes(&[0, 0]))
        .errno(EINVAL);
    c.call(Request::new(cmd::VERSION)).errno(EINVAL);
    c.negotiate();
    c.assert_alive();
}
