//! Chain parsing end to end: framing, many segments and indirect tables, malformed
//! chains.

use super::*;

#[test]
fn framing_does_not_matter() {
    let img = Image::new("framing");
    let b = img.open(|_| {});
    let mut r = Rig::new(&b, false);
    // Header and data in one readable descriptor.
    r.header(HDR, VIRTIO_BLK_T_OUT, 8);
    let data = pattern(2, 512);
    r.fill(HDR + 16, &data);
    assert_eq!(r.run(&b, &[(HDR, 16 + 512, R), (STATUS, 1, W)]), 1);
    assert_eq!(r.status(), OK);
    assert_eq!(&img.bytes()[8 * 512..9 * 512], &data[..]);
    // Header split over two descriptors, data and status in one writable one.
    r.header(HDR, VIRTIO_BLK_T_IN, 8);
    assert_eq!(
        r.run(&b, &[(HDR, 8, R), (HDR + 8, 8, R), (DATA, 513, W)]),
        513
    );
    assert_eq!(&r.read(DATA, 512)[..], &data[..]);
    assert_eq!(r.read(DATA + 512, 1)[0], OK);
    // Data crossing from one guest memory region into the next.
    let across = REGION - 512;
    let data = pattern(3, 1024);
    r.fill(across, &data);
    let (st, _) = r.request(&b, VIRTIO_BLK_T_OUT, 20, &[(across, 1024, R)]);
    assert_eq!(st, OK);
    assert_eq!(&img.bytes()[20 * 512..22 * 512], &data[..]);
    r.fill(across, &[0; 1024]);
    let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 20, &[(across, 1024, W)]);
    assert_eq!((st, len), (OK, 1025));
    assert_eq!(r.read(across, 1024), data);
}

#[test]
fn many_segments_and_indirect_tables() {
    let img = Image::new("segs");
    let b = img.open(|_| {});
    let mut r = Rig::new(&b, false);
    // 40 data descriptors of 512 bytes (more than one iovec batch when split).
    let data = pattern(4, 40 * 512);
    r.fill(DATA, &data);
    let segs: Vec<_> = (0..40).map(|i| (DATA + 1024 * i, 512, R)).collect();
    for i in 0..40 {
        r.fill(
            DATA + 1024 * i,
            &data[512 * i as usize..512 * (i as usize + 1)],
        );
    }
    let (st, _) = r.request(&b, VIRTIO_BLK_T_OUT, 100, &segs);
    assert_eq!(st, OK);
    assert_eq!(&img.bytes()[100 * 512..140 * 512], &data[..]);

    // The same read through an indirect table.
    r.header(HDR, VIRTIO_BLK_T_IN, 100);
    let n = 42u16;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, 0),
            41 => (STATUS, 1, VRING_DESC_F_WRITE),
            _ => (
                DATA + 0x10_0000 + 512 * u64::from(i - 1),
                512,
                VRING_DESC_F_WRITE,
            ),
        };
        let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
        r.write_desc(TABLE, i, addr, len, (flags | next) as u16, i + 1);
    }
    let head = r.next_desc;
    r.write_desc(
        DESC,
        head,
        TABLE,
        16 * u32::from(n),
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    r.next_desc += 1;
    r.publish(head);
    r.kick(&b);
    assert_eq!(r.used(r.used_seen), (u32::from(head), 40 * 512 + 1));
    r.used_seen += 1;
    assert_eq!(r.status(), OK);
    assert_eq!(r.read(DATA + 0x10_0000, 40 * 512), data);
}

#[test]
fn malformed_chains_never_panic() {
    let img = Image::new("bad");
    let b = img.open(|_| {});
    let mut r = Rig::new(&b, false);
    let m = |r: &Rig| r.m();
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let set_status = |r: &Rig| m(r).write_obj(0xffu8, GuestAddress(STATUS)).unwrap();

    // No status descriptor: the last one is device-readable. Used length 0.
    set_status(&r);
    assert_eq!(r.run(&b, &[(HDR, 16, R), (DATA, 512, R)]), 0);
    assert_eq!(r.status(), 0xff);
    // The status descriptor is read-only.
    assert_eq!(
        r.run(&b, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]),
        0
    );
    assert_eq!(r.status(), 0xff);
    // A lone descriptor; a zero-length status descriptor.
    assert_eq!(r.run(&b, &[(STATUS, 1, W)]), 1);
    assert_eq!(r.status(), IOERR);
    set_status(&r);
    assert_eq!(r.run(&b, &[(HDR, 16, R), (STATUS, 0, W)]), 0);
    assert_eq!(r.status(), 0xff);
    // Header too short, or device-writable.
    assert_eq!(r.run(&b, &[(HDR, 8, R), (STATUS, 1, W)]), 1);
    assert_eq!(r.status(), IOERR);
    set_status(&r);
    assert_eq!(r.run(&b, &[(HDR, 16, W), (STATUS, 1, W)]), 1);
    assert_eq!(r.status(), IOERR);
    // Wrong data direction, and a readable descriptor after a writable one.
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, R)]).0,
        IOERR
    );
    r.header(HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]).0,
        IOERR
    );
    set_status(&r);
    assert_eq!(
        r.run(
            &b,
            &[(HDR, 16, R), (DATA, 512, W), (DATA, 512, R), (STATUS, 1, W)]
        ),
        1
    );
    assert_eq!(r.status(), IOERR);
    // An empty data buffer.
    assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 0, W)]).0, IOERR);
    // Data outside guest memory, and straddling its end.
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 0, &[(1 << 40, 512, W)]).0,
        IOERR
    );
    let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 0, &[(MEM_END - 256, 512, W)]);
    assert_eq!(st, IOERR);
    let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, W)]);
    assert_eq!(st, IOERR);
    // The status byte outside guest memory.
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        r.run(&b, &[(HDR, 16, R), (DATA, 512, W), (MEM_END, 1, W)]),
        0
    );
    assert_eq!(r.run(&b, &[(HDR, 16, R), (u64::MAX, 1, W)]), 0);
    // The header outside guest memory.
    assert_eq!(r.run(&b, &[(MEM_END - 8, 16, R), (STATUS, 1, W)]), 1);
    assert_eq!(r.status(), IOERR);

    // A descriptor loop: 0 -> 1 -> 0 -> ... (virtio-queue gives up after QSIZE).
    set_status(&r);
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let head = r.next_desc;
    let nf = VRING_DESC_F_NEXT as u16;
    r.write_desc(DESC, head, HDR, 16, nf, head + 1);
    r.write_desc(
        DESC,
        head + 1,
        STATUS,
        1,
        nf | VRING_DESC_F_WRITE as u16,
        head,
    );
    r.next_desc += 2;
    r.publish(head);
    r.kick(&b);
    assert_eq!(
        r.used(r.used_seen),
        (u32::from(head), 0),
        "no status: length 0"
    );
    r.used_seen += 1;
    // A next index past the table.
    let head = r.next_desc;
    r.write_desc(DESC, head, HDR, 16, nf, QSIZE + 5);
    r.next_desc += 1;
    r.publish(head);
    r.kick(&b);
    assert_eq!(r.used(r.used_seen), (u32::from(head), 0));
    r.used_seen += 1;
    // An indirect table longer than the device keeps: IOERR in the real last byte.
    let n: u16 = 1100;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, 0),
            _ if i == n - 1 => (STATUS, 1, VRING_DESC_F_WRITE),
            _ => (DATA, 512, VRING_DESC_F_WRITE),
        };
        let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
        r.write_desc(TABLE, i, addr, len, (flags | next) as u16, i + 1);
    }
    let head = r.next_desc;
    r.write_desc(
        DESC,
        head,
        TABLE,
        16 * u32::from(n),
        VRING_DESC_F_INDIRECT as u16,
        0,
    );
    r.next_desc += 1;
    r.publish(head);
    set_status(&r);
    r.kick(&b);
    assert_eq!(r.used(r.used_seen), (u32::from(head), 1));
    r.used_seen += 1;
    assert_eq!(r.status(), IOERR);
    // A head index past the table: no used entry can name it; the next request is
    // served all the same.
    r.publish(QSIZE + 3);
    r.header(HDR, VIRTIO_BLK_T_IN, 0);
    let head = r.post(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    r.kick(&b);
    assert_eq!(r.used_idx(), r.used_seen.wrapping_add(1));
    assert_eq!(r.used(r.used_seen), (u32::from(head), 513));
    r.used_seen += 1;

    // The device still works.
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]),
        (OK, 513)
    );
    assert_eq!(img.bytes(), vec![0x5a; IMAGE]);
}
