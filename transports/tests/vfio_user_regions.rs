//! vfio-user protocol tests of regions (vfio-user.rst, "VFIO_USER_DEVICE_GET_REGION_INFO",
//! "VFIO_USER_DEVICE_GET_REGION_IO_FDS", "VFIO_USER_REGION_READ",
//! "VFIO_USER_REGION_WRITE", "VFIO_USER_REGION_WRITE_MULTI"): every region index, the
//! sparse-mmap capability and mappable fds, io fds, trapped reads and writes, and every
//! way an access is refused (range, index, absent region, size, count mismatches,
//! WRITE_MULTI limits). Raw Unix socket against an in-process `VfioUserServer`; every
//! error reply's errno is asserted, then that the server still serves.

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use common::device::*;
use common::*;
use unidev_core::pci::PciRegion;
use unidev_transports::vfio_user::codec::decode_sparse_mmap;
use unidev_transports::vfio_user::ServerConfig;

/// Region info flags (`VFIO_REGION_INFO_FLAG_*`).
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
        let r = c.call(Request::region_info(256, index as u32));
        let p = r.ok();
        assert_eq!(p.len(), argsz as usize, "region {index}");
        let info = RegionInfoReply::parse(p);
        assert_eq!(info.argsz, argsz, "region {index} argsz");
        assert_eq!(info.flags, flags, "region {index} flags");
        assert_eq!(info.index, index as u32, "region {index} index");
        let cap_offset = if flags & RI_CAPS != 0 { 32 } else { 0 };
        assert_eq!(info.cap_offset, cap_offset, "region {index} cap_offset");
        assert_eq!(info.size, size, "region {index} size");
        assert_eq!(info.offset, offset, "region {index} offset");
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
    let r = c.call(Request::region_info(64, 0));
    let p = r.ok().to_vec();
    let info = RegionInfoReply::parse(&p);
    assert_eq!(info.flags, RI_READ | RI_WRITE | RI_MMAP | RI_CAPS);
    let cap_offset = info.cap_offset;
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
    let base = info.offset;
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
    let r = c.call(Request::region_info(32, 2));
    let p = r.ok();
    assert_eq!(p.len(), 32);
    let info = RegionInfoReply::parse(p);
    assert_eq!(info.argsz, 32);
    assert_eq!(info.flags, RI_READ | RI_WRITE | RI_MMAP);
    assert_eq!(info.cap_offset, 0);
    assert_eq!(info.size, BAR2_SIZE);
    assert_eq!(info.offset, BAR2_FILE_OFFSET);
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
    let r = c.call(Request::region_info(32, 0));
    let p = r.ok();
    assert_eq!(p.len(), 32, "only the fixed part fits");
    let info = RegionInfoReply::parse(p);
    assert_eq!(info.argsz, 64, "argsz = size needed");
    // QEMU's client rejects CAPS with a cap_offset outside the reply, so a reply that
    // carries no capabilities must not claim any.
    assert_eq!(info.flags, RI_READ | RI_WRITE | RI_MMAP);
    assert_eq!(info.cap_offset, 0, "cap_offset");
    assert_eq!(info.size, BAR0_SIZE);
    assert!(r.fds.is_empty(), "the fd comes with the full answer only");
    // The retry with the size asked for gets everything.
    let r = c.call(Request::region_info(64, 0));
    let p = r.ok();
    assert_eq!(p.len(), 64);
    let info = RegionInfoReply::parse(p);
    assert_eq!(info.flags, RI_READ | RI_WRITE | RI_MMAP | RI_CAPS);
    assert_eq!(info.cap_offset, 32);
    assert_eq!(r.fds.len(), 1);
    c.assert_alive();
}

#[test]
fn region_info_for_a_bad_index_or_argsz_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for index in [9u32, 10, u32::MAX] {
        c.call(Request::region_info(256, index)).errno(EINVAL);
    }
    c.call(Request::region_info(31, 0)).errno(EINVAL);
    c.assert_alive();
}

#[test]
fn region_io_fds_are_empty_and_checked() {
    let h = Harness::start();
    let mut c = h.client();
    for index in 0..9u32 {
        let r = c.call(Request::region_io_fds(1024, 0, index));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(four_u32s(p), (16, 0, index, 0));
        assert!(r.fds.is_empty());
    }
    c.call(Request::region_io_fds(16, 0, 9)).errno(EINVAL);
    c.call(Request::region_io_fds(16, 1, 0)).errno(EINVAL);
    c.call(Request::region_io_fds(8, 0, 0)).errno(EINVAL);
    c.assert_alive();
}

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
        c.call(Request::region_read(r, offset, count)).errno(EINVAL);
        let data = vec![0x77; count as usize];
        c.call(Request::region_write(r, offset, &data))
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
        c.call(Request::region_read(r, 0, 4)).errno(EINVAL);
        c.call(Request::region_write(r, 0, &[1])).errno(EINVAL);
    }
    c.assert_alive();
}

#[test]
fn access_to_an_absent_region_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    for r in [region::ROM, region::VGA, 3, 4, 5] {
        c.call(Request::region_read(r, 0, 4)).errno(EINVAL);
        c.call(Request::region_write(r, 0, &[1])).errno(EINVAL);
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
    let h = Harness::with(Opts::with_config(ServerConfig {
        max_data_xfer_size: max,
        ..config()
    }));
    let mut c = h.client();
    c.call(Request::region_read(region::BAR1, 0, max + 1))
        .errno(libc::E2BIG);
    let data = vec![1u8; max as usize + 1];
    c.call(Request::region_write(region::BAR1, 0, &data))
        .errno(libc::E2BIG);
    // At the limit, the range check decides (BAR1 is only 256 bytes).
    c.call(Request::region_read(region::BAR1, 0, max))
        .errno(EINVAL);
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn region_write_with_count_different_from_the_data_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(Request::region_access(
        cmd::REGION_WRITE,
        region::BAR1,
        0,
        4,
        &[1, 2, 3],
    ))
    .errno(EINVAL);
    c.call(Request::region_access(
        cmd::REGION_WRITE,
        region::BAR1,
        0,
        2,
        &[1, 2, 3, 4],
    ))
    .errno(EINVAL);
    c.call(Request::region_access(
        cmd::REGION_WRITE,
        region::BAR1,
        0,
        1,
        &[],
    ))
    .errno(EINVAL);
    assert!(h.record.lock().unwrap().writes.is_empty());
    c.assert_alive();
}

#[test]
fn region_read_with_trailing_bytes_is_einval() {
    let h = Harness::start();
    let mut c = h.client();
    c.call(Request::region_access(
        cmd::REGION_READ,
        region::CONFIG,
        0,
        4,
        &[0, 0, 0, 0],
    ))
    .errno(EINVAL);
    c.call(Request::region_access(
        cmd::REGION_READ,
        region::CONFIG,
        0,
        4,
        &[0],
    ))
    .errno(EINVAL);
    c.assert_alive();
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
    let r = c.call(Request::write_multi(&entries));
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
    let r = c.call(Request::write_multi(&many));
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
    c.call(Request::write_multi(&many)).errno(EINVAL);
    // Only the count says 201.
    c.call(Request::write_multi(&many[..1]).patch_u64(0, 201))
        .errno(EINVAL);
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
    c.call(Request::write_multi(&entries)).errno(EINVAL);
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
    c.call(Request::write_multi(&entries)).errno(EINVAL);
    assert_eq!(c.read_region(region::BAR1, 0, 2), [1, 0]);
    c.assert_alive();
}
