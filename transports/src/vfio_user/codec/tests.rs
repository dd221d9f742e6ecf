//! The codec's unit tests: every layout round-trips, refuses every truncation, and sits
//! at the spec's offsets.

use super::*;

#[test]
fn header_round_trip_and_reply_flags() {
    let h = Header::command(7, Command::RegionWrite, 20, true);
    let d = Header::decode(&h.encode());
    assert_eq!(d, h);
    assert!(d.is_command() && d.no_reply() && !d.is_reply());
    assert_eq!(d.size, 36);
    let r = d.reply(4);
    assert!(r.is_reply() && !r.is_error());
    assert_eq!((r.id, r.command, r.size), (7, 10, 20));
    let e = d.error_reply(libc::EINVAL);
    assert!(e.is_reply() && e.is_error());
    assert_eq!((e.size, e.error), (16, libc::EINVAL as u32));
    // Bytes on the wire are little-endian at fixed offsets.
    assert_eq!(&h.encode()[..4], &[7, 0, 10, 0]);
}

#[test]
fn short_payloads_are_errors_not_panics() {
    for len in 0..DmaMapRequest::SIZE {
        assert!(DmaMapRequest::decode(&vec![0xff; len]).is_err());
    }
    assert!(IrqSet::decode(&[0; 19]).is_err());
    assert!(RegionAccess::decode(&[0; 15]).is_err());
    assert!(decode_write_multi(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
    assert!(decode_write_multi(&201u64.to_le_bytes()).is_err());
    let mut r = Reader::new("x", &[1, 2]);
    assert!(r.bytes(usize::MAX).is_err());
}

#[test]
fn payload_round_trips() {
    let m = DmaMapRequest {
        argsz: 32,
        flags: 3,
        offset: 0x1000,
        address: 0xfeed_0000,
        size: 0x2000,
    };
    assert_eq!(DmaMapRequest::decode(&m.encode()).unwrap(), m);
    let a = RegionAccess {
        offset: 4,
        region: 2,
        count: 2,
    };
    let enc = a.encode(&[9, 8]);
    assert_eq!(RegionAccess::decode(&enc).unwrap(), (a, &[9u8, 8][..]));
    let e = WriteMultiEntry {
        offset: 1,
        region: 7,
        count: 4,
        data: [1, 2, 3, 4, 0, 0, 0, 0],
    };
    assert_eq!(
        decode_write_multi(&encode_write_multi(&[e, e])).unwrap(),
        vec![e, e]
    );
}

#[test]
fn sparse_mmap_cap_round_trip() {
    let mut buf = RegionInfoWire {
        argsz: 0,
        flags: REGION_INFO_FLAG_CAPS,
        index: 0,
        cap_offset: 32,
        size: 0x4000,
        offset: 0,
    }
    .encode();
    buf.extend(encode_sparse_mmap_cap(&[
        (0x1000, 0x1000),
        (0x3000, 0x1000),
    ]));
    assert_eq!(
        decode_sparse_mmap(&buf, 32).unwrap(),
        Some(vec![(0x1000, 0x1000), (0x3000, 0x1000)])
    );
    assert!(decode_sparse_mmap(&buf[..40], 32).is_err());
}

#[test]
fn dma_rw_layouts() {
    let q = DmaRwLayout::Qemu.encode(0x1000, 3, &[1, 2, 3]);
    assert_eq!(q.len(), 8 + 4 + 3 + 4);
    assert_eq!(&q[12..15], &[1, 2, 3]);
    let (a, c, d) = DmaRwLayout::Qemu.decode(&q).unwrap();
    assert_eq!((a, c, &d[..3]), (0x1000, 3, &[1u8, 2, 3][..]));
    let s = DmaRwLayout::Spec.encode(0x1000, 3, &[1, 2, 3]);
    assert_eq!(s.len(), 16 + 3);
    assert_eq!(
        DmaRwLayout::Spec.decode(&s).unwrap(),
        (0x1000, 3, &[1u8, 2, 3][..])
    );
}

/// The errors of short payloads, as a field-by-field read reports them: the command,
/// and the bytes the first field that does not fit needs.
#[test]
fn short_reads_report_the_first_field_that_does_not_fit() {
    let short = |what: &'static str, need: usize, got: usize| WireError {
        what,
        why: format!("needs {need} bytes, got {got}"),
    };
    assert_eq!(
        DmaMapRequest::decode(&[0; 10]),
        Err(short("DMA_MAP", 16, 10))
    );
    assert_eq!(
        DmaUnmapRequest::decode(&[0; 23]),
        Err(short("DMA_UNMAP", 24, 23))
    );
    assert_eq!(DeviceInfo::decode(&[]), Err(short("DEVICE_GET_INFO", 4, 0)));
    assert_eq!(
        RegionInfoWire::decode(&[0; 17]),
        Err(short("DEVICE_GET_REGION_INFO", 24, 17))
    );
    assert_eq!(
        RegionIoFds::decode(&[0; 8]),
        Err(short("DEVICE_GET_REGION_IO_FDS", 12, 8))
    );
    assert_eq!(
        IrqInfoWire::decode(&[0; 15]),
        Err(short("DEVICE_GET_IRQ_INFO", 16, 15))
    );
    assert_eq!(
        IrqSet::decode(&[0; 19]),
        Err(short("DEVICE_SET_IRQS", 20, 19))
    );
    assert_eq!(
        RegionAccess::decode(&[0; 9]),
        Err(short("REGION_READ/WRITE", 12, 9))
    );
    assert_eq!(
        DmaRwLayout::Qemu.decode(&[0; 11]),
        Err(short("DMA_READ/WRITE", 12, 11))
    );
    assert_eq!(
        DmaRwLayout::Spec.decode(&[0; 12]),
        Err(short("DMA_READ/WRITE", 16, 12))
    );
    // REGION_WRITE_MULTI: one entry announced, its data cut short.
    let mut multi = 1u64.to_le_bytes().to_vec();
    multi.extend([0; 18]);
    assert_eq!(
        decode_write_multi(&multi),
        Err(short("REGION_WRITE_MULTI", 32, 26))
    );
    multi.extend([0; 6]);
    multi[20] = 9;
    assert_eq!(
        decode_write_multi(&multi),
        Err(WireError {
            what: "REGION_WRITE_MULTI",
            why: "entry count 9 exceeds 8".into(),
        })
    );
    // A sparse-mmap capability cut after its header.
    let mut cap = vec![0; 32];
    cap.extend(encode_sparse_mmap_cap(&[(0x1000, 0x1000)]));
    assert_eq!(
        decode_sparse_mmap(&cap[..40], 32),
        Err(short("region capability", 12, 8))
    );
    assert_eq!(
        decode_sparse_mmap(&cap[..60], 32),
        Err(short("region capability", 32, 28))
    );
}

/// A layout read from distinct bytes writes them back, consumes exactly its size,
/// and refuses every shorter buffer with the bytes a field needed.
fn check_layout<T: WireLayout + PartialEq + fmt::Debug>(name: &str) {
    let bytes: Vec<u8> = (1..=T::SIZE).map(|i| i as u8).collect();
    let mut longer = bytes.clone();
    longer.extend([0xee, 0xef]);
    let mut r = Reader::new("layout", &longer);
    let value = T::read(&mut r).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(r.rest(), [0xee, 0xef], "{name} reads exactly its size");
    let mut w = Writer::default();
    value.write(&mut w);
    assert_eq!(w.0, bytes, "{name} writes back what it read");
    let mut array = [0u8; 40];
    value.write(&mut array.iter_mut());
    assert_eq!(
        array[..T::SIZE],
        bytes,
        "{name} fills an array front to back"
    );
    assert!(
        array[T::SIZE..].iter().all(|&b| b == 0),
        "{name} stays in its size"
    );
    assert_eq!(T::read(&mut Reader::new("layout", &w.0)), Ok(value));
    for len in 0..T::SIZE {
        let e = T::read(&mut Reader::new("layout", &bytes[..len]))
            .expect_err(&format!("{name} from {len} bytes"));
        let need: usize = e
            .why
            .strip_prefix("needs ")
            .and_then(|s| s.strip_suffix(&format!(" bytes, got {len}")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {e}"));
        assert!(need > len && need <= T::SIZE, "{name}: {e}");
        assert_eq!(e.what, "layout");
    }
}

#[test]
fn every_layout_round_trips_and_refuses_every_truncation() {
    check_layout::<Header>("Header");
    check_layout::<DmaMapRequest>("DmaMapRequest");
    check_layout::<DmaUnmapRequest>("DmaUnmapRequest");
    check_layout::<DeviceInfo>("DeviceInfo");
    check_layout::<RegionInfoWire>("RegionInfoWire");
    check_layout::<RegionCapHeader>("RegionCapHeader");
    check_layout::<SparseMmapAreaCount>("SparseMmapAreaCount");
    check_layout::<SparseMmapArea>("SparseMmapArea");
    check_layout::<RegionIoFds>("RegionIoFds");
    check_layout::<IrqInfoWire>("IrqInfoWire");
    check_layout::<IrqSet>("IrqSet");
    check_layout::<RegionAccess>("RegionAccess");
    check_layout::<WriteMultiEntry>("WriteMultiEntry");
    check_layout::<DmaRwQemu>("DmaRwQemu");
    check_layout::<DmaRwSpec>("DmaRwSpec");
    check_layout::<u16>("u16");
    check_layout::<u32>("u32");
    check_layout::<u64>("u64");
    check_layout::<[u8; 8]>("[u8; 8]");
}

/// The public codec of every command payload: round trip, trailing bytes, and every
/// truncation refused as an error naming the command.
#[test]
fn every_payload_codec_round_trips_and_refuses_every_truncation() {
    macro_rules! check_fixed {
        ($($ty:ident => $what:literal),* $(,)?) => {$(
            let bytes: Vec<u8> = (1..=$ty::SIZE).map(|i| i as u8 ^ 0x80).collect();
            let value = $ty::decode(&bytes).unwrap();
            assert_eq!(value.encode(), bytes, stringify!($ty));
            let mut longer = bytes.clone();
            longer.push(0xff);
            assert_eq!($ty::decode(&longer), Ok(value), "{} ignores extra bytes", stringify!($ty));
            for len in 0..$ty::SIZE {
                let e = $ty::decode(&bytes[..len]).unwrap_err();
                assert_eq!(e.what, $what, "{} from {len} bytes", stringify!($ty));
            }
        )*};
    }
    macro_rules! check_with_data {
        ($($ty:ident => $what:literal),* $(,)?) => {$(
            let bytes: Vec<u8> = (1..=$ty::SIZE).map(|i| i as u8 ^ 0x40).collect();
            let (value, rest) = $ty::decode(&bytes).unwrap();
            assert!(rest.is_empty());
            assert_eq!(value.encode(&[]), bytes, stringify!($ty));
            let with_data = value.encode(&[7, 8, 9]);
            assert_eq!(&with_data[..$ty::SIZE], &bytes[..]);
            assert_eq!($ty::decode(&with_data), Ok((value, &[7u8, 8, 9][..])));
            for len in 0..$ty::SIZE {
                let e = $ty::decode(&bytes[..len]).unwrap_err();
                assert_eq!(e.what, $what, "{} from {len} bytes", stringify!($ty));
            }
        )*};
    }
    check_fixed!(
        DmaMapRequest => "DMA_MAP",
        DmaUnmapRequest => "DMA_UNMAP",
        DeviceInfo => "DEVICE_GET_INFO",
        RegionInfoWire => "DEVICE_GET_REGION_INFO",
        RegionIoFds => "DEVICE_GET_REGION_IO_FDS",
        IrqInfoWire => "DEVICE_GET_IRQ_INFO",
    );
    check_with_data!(
        IrqSet => "DEVICE_SET_IRQS",
        RegionAccess => "REGION_READ/WRITE",
    );
    for layout in [DmaRwLayout::Qemu, DmaRwLayout::Spec] {
        let at = layout.data_offset();
        let p = layout.encode(0x1122_3344_5566_7788, 0x99aa_bbcc, &[5, 6]);
        assert_eq!(&p[at..at + 2], &[5, 6]);
        assert_eq!(
            layout.decode(&p).map(|(a, c, d)| (a, c, d[..2].to_vec())),
            Ok((0x1122_3344_5566_7788, 0x99aa_bbcc, vec![5, 6]))
        );
        for len in 0..at {
            assert_eq!(layout.decode(&p[..len]).unwrap_err().what, "DMA_READ/WRITE");
        }
    }
}

/// Field offsets as the spec lays them out, for the layouts whose fields differ in
/// width (a swapped pair of equal-width fields is caught by the protocol tests).
#[test]
fn layouts_put_fields_at_the_spec_offsets() {
    let h = Header {
        id: 0x0102,
        command: 0x0304,
        size: 0x0506_0708,
        flags: 0x090a_0b0c,
        error: 0x0d0e_0f10,
    };
    assert_eq!(
        h.encode(),
        [2, 1, 4, 3, 8, 7, 6, 5, 0xc, 0xb, 0xa, 9, 0x10, 0xf, 0xe, 0xd]
    );
    assert_eq!(Header::decode(&h.encode()), h);
    let m = DmaMapRequest {
        argsz: 32,
        flags: 3,
        offset: 0x1000,
        address: 0x2000,
        size: 0x3000,
    }
    .encode();
    assert_eq!((m[0], m[4], m[9], m[17], m[25]), (32, 3, 0x10, 0x20, 0x30));
    let a = RegionAccess {
        offset: 0x0100,
        region: 7,
        count: 4,
    }
    .encode(&[0xaa]);
    assert_eq!((a[1], a[8], a[12], a[16]), (1, 7, 4, 0xaa));
    let r = RegionInfoWire {
        argsz: 1,
        flags: 2,
        index: 3,
        cap_offset: 4,
        size: 5,
        offset: 6,
    }
    .encode();
    assert_eq!((r[0], r[4], r[8], r[12], r[16], r[24]), (1, 2, 3, 4, 5, 6));
    let cap = encode_sparse_mmap_cap(&[(0x10, 0x20)]);
    assert_eq!(cap.len(), 32);
    assert_eq!(
        (cap[0], cap[2], cap[4], cap[8], cap[16], cap[24]),
        (1, 1, 0, 1, 0x10, 0x20)
    );
    let e = WriteMultiEntry {
        offset: 1,
        region: 2,
        count: 3,
        data: [4; 8],
    };
    let w = encode_write_multi(&[e]);
    assert_eq!(w.len(), 8 + WRITE_MULTI_ENTRY);
    assert_eq!((w[0], w[8], w[16], w[20], w[24], w[31]), (1, 1, 2, 3, 4, 4));
}
