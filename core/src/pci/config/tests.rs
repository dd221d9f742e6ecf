//! Unit tests of the configuration space: register semantics, BAR sizing, capabilities,
//! and the builder's checks.

use super::*;

fn rd32(c: &ConfigSpace, off: u64) -> u32 {
    c.read_u32(off)
}

fn wr32(c: &mut ConfigSpace, off: u64, v: u32) -> ConfigWrite {
    c.write(off, &v.to_le_bytes())
}

fn wr16(c: &mut ConfigSpace, off: u64, v: u16) -> ConfigWrite {
    c.write(off, &v.to_le_bytes())
}

fn full() -> ConfigSpace {
    ConfigSpace::builder(0x1af4, 0x1041)
        .class(0x01, 0x80, 0x00)
        .revision(1)
        .subsystem(0x1af4, 0x1100)
        .interrupt_pin(1)
        .bar(0, Bar::mem32(0x1000))
        .bar(1, Bar::io(0x20))
        .bar(2, Bar::mem64(0x4000).prefetchable())
        .bar(4, Bar::mem64(1 << 33))
        .rom(0x10000)
        .capability(Capability::PowerManagement)
        .capability(Capability::Msi {
            vectors: 4,
            addr64: true,
            per_vector_mask: true,
        })
        .capability(Capability::Msix {
            table_size: 70,
            table_bar: 2,
            table_offset: 0,
            pba_bar: 2,
            pba_offset: 0x2000,
        })
        .capability(Capability::PciExpress)
        .capability(Capability::Vendor(vec![0xaa, 0xbb, 0xcc]))
        .build()
        .unwrap()
}

#[test]
fn identity_is_read_only() {
    let mut c = full();
    let before: Vec<u32> = [0x00, 0x08, 0x0c, 0x2c, 0x34, 0x3c]
        .iter()
        .map(|&o| rd32(&c, o))
        .collect();
    assert_eq!(rd32(&c, 0), 0x1041_1af4);
    assert_eq!(rd32(&c, 0x08), 0x0180_0001);
    assert_eq!(rd32(&c, 0x2c), 0x1100_1af4);
    assert_eq!(c.read_u16(0x3c) >> 8, 1, "interrupt pin");
    for off in [0x00u64, 0x08, 0x2c, 0x34] {
        assert!(wr32(&mut c, off, 0xffff_ffff).is_empty());
    }
    // Header type and BIST (0x0e, 0x0f) are read-only; cache line and latency are
    // writable, except latency for a PCIe function.
    wr32(&mut c, 0x0c, 0xffff_ffff);
    assert_eq!(rd32(&c, 0x0c), 0x0000_00ff);
    // Interrupt line is RW, pin and min_gnt/max_lat are not.
    wr32(&mut c, 0x3c, 0xffff_ffff);
    assert_eq!(rd32(&c, 0x3c), 0x0000_01ff);
    assert_eq!(c.vendor_id(), 0x1af4);
    assert_eq!(c.device_id(), 0x1041);
    c.reset();
    let after: Vec<u32> = [0x00, 0x08, 0x0c, 0x2c, 0x34, 0x3c]
        .iter()
        .map(|&o| rd32(&c, o))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn latency_timer_is_writable_without_pcie() {
    let mut c = ConfigSpace::builder(1, 2).build().unwrap();
    c.write(0x0d, &[0x40]);
    assert_eq!(c.read_u16(0x0c), 0x4000);
    assert_eq!(c.status() & STATUS_CAP_LIST, 0);
    assert_eq!(c.find_capability(Capability::ID_PM), None);
}

#[test]
fn command_has_only_the_writable_bits() {
    let mut c = full();
    let w = wr16(&mut c, 4, 0xffff);
    assert!(w.command);
    assert_eq!(c.command(), 0x0547);
    assert!(c.io_enabled() && c.memory_enabled() && c.bus_master() && c.intx_disabled());
    assert!(wr16(&mut c, 4, 0xffff).is_empty(), "no change, no flag");
    // A function with only memory BARs cannot enable I/O decoding, and vice versa.
    let mut m = ConfigSpace::builder(1, 2)
        .bar(0, Bar::mem32(16))
        .build()
        .unwrap();
    wr16(&mut m, 4, 0xffff);
    assert_eq!(m.command(), 0x0546);
    let mut i = ConfigSpace::builder(1, 2)
        .bar(0, Bar::io(4))
        .build()
        .unwrap();
    wr16(&mut i, 4, 0xffff);
    assert_eq!(i.command(), 0x0545);
}

#[test]
fn status_error_bits_are_rw1c_and_intx_is_device_controlled() {
    let mut c = full();
    assert_eq!(c.status(), STATUS_CAP_LIST);
    // Software cannot set anything in Status.
    wr16(&mut c, 6, 0xffff);
    assert_eq!(c.status(), STATUS_CAP_LIST);
    // Pretend the device latched errors (test-only poke) and clear one of them.
    c.data[7] = 0xf9;
    wr16(&mut c, 6, 0x8000);
    assert_eq!(c.status(), 0x7900 | STATUS_CAP_LIST);
    wr16(&mut c, 6, 0x0100);
    assert_eq!(c.status(), 0x7800 | STATUS_CAP_LIST);
    c.set_intx_status(true);
    assert_eq!(c.status() & STATUS_INTX, STATUS_INTX);
    wr16(&mut c, 6, 0xffff);
    assert_eq!(
        c.status(),
        STATUS_INTX | STATUS_CAP_LIST,
        "INTx is read-only"
    );
    c.set_intx_status(false);
    assert_eq!(c.status(), STATUS_CAP_LIST);
}

#[test]
fn bar_sizing_for_every_kind() {
    let mut c = full();
    // Flags before sizing.
    assert_eq!(rd32(&c, 0x10), 0x0);
    assert_eq!(rd32(&c, 0x14), 0x1);
    assert_eq!(rd32(&c, 0x18), 0xc);
    assert_eq!(rd32(&c, 0x20), 0x4);
    for i in 0..6 {
        wr32(&mut c, 0x10 + 4 * i, 0xffff_ffff);
    }
    assert_eq!(rd32(&c, 0x10), 0xffff_f000, "mem32 4 KiB");
    assert_eq!(rd32(&c, 0x14), 0xffff_ffe1, "io 32 bytes");
    assert_eq!(
        rd32(&c, 0x18),
        0xffff_c00c,
        "mem64 prefetchable 16 KiB, low"
    );
    assert_eq!(rd32(&c, 0x1c), 0xffff_ffff, "mem64 16 KiB, high");
    assert_eq!(
        rd32(&c, 0x20),
        0x0000_0004,
        "mem64 8 GiB, low: no address bits"
    );
    assert_eq!(rd32(&c, 0x24), 0xffff_fffe, "mem64 8 GiB, high");
    // Program addresses.
    let w = wr32(&mut c, 0x10, 0xfebf_1000);
    assert_eq!(w.bars, 0b1);
    wr32(&mut c, 0x14, 0xc040);
    let w = wr32(&mut c, 0x1c, 0x0000_0001);
    assert!(w.bar(2) && !w.bar(3), "upper half reports the lower index");
    wr32(&mut c, 0x18, 0x2000_0000);
    wr32(&mut c, 0x20, 0);
    wr32(&mut c, 0x24, 0x4);
    assert_eq!(c.bar_address(0), Some(0xfebf_1000));
    assert_eq!(c.bar_address(1), Some(0xc040));
    assert_eq!(c.bar_address(2), Some(0x1_2000_0000));
    assert_eq!(c.bar_address(3), None, "upper half is not a BAR of its own");
    assert_eq!(c.bar_address(4), Some(0x4_0000_0000));
    assert_eq!(c.bar(2), Some(Bar::mem64(0x4000).prefetchable()));
    assert_eq!(c.bar(3), None);
    assert_eq!(c.bar(9), None);
    // Low bits of an address written unaligned are dropped; flags stay.
    wr32(&mut c, 0x10, 0xfebf_1fff);
    assert_eq!(rd32(&c, 0x10), 0xfebf_1000);
}

#[test]
fn unused_bars_read_zero_and_ignore_writes() {
    let mut c = ConfigSpace::builder(1, 2)
        .bar(1, Bar::mem32(0x100))
        .build()
        .unwrap();
    for i in [0u64, 2, 3, 4, 5] {
        assert!(wr32(&mut c, 0x10 + 4 * i, 0xffff_ffff).is_empty());
        assert_eq!(rd32(&c, 0x10 + 4 * i), 0);
    }
    assert_eq!(c.bar_address(0), None);
    // No ROM: the ROM BAR reads 0 and ignores writes.
    wr32(&mut c, 0x30, 0xffff_ffff);
    assert_eq!(rd32(&c, 0x30), 0);
    assert_eq!(c.rom_address(), None);
}

#[test]
fn rom_bar_sizing_and_enable() {
    let mut c = full();
    let w = wr32(&mut c, 0x30, 0xffff_ffff);
    assert!(w.rom);
    assert_eq!(rd32(&c, 0x30), 0xffff_0001, "64 KiB ROM, enable bit set");
    wr32(&mut c, 0x30, 0xfeb0_0001);
    assert_eq!(c.rom_address(), Some(0xfeb0_0000));
    assert!(!c.rom_enabled(), "memory decoding still off");
    wr16(&mut c, 4, COMMAND_MEMORY);
    assert!(c.rom_enabled());
    assert_eq!(c.rom_size(), 0x10000);
}

#[test]
fn capability_chain_walk() {
    let c = full();
    let mut ids = Vec::new();
    let mut ptr = c.read_u16(0x34) as u8;
    while ptr != 0 {
        assert_eq!(ptr % 4, 0, "aligned");
        assert!(ptr >= 0x40);
        let mut hdr = [0u8; 2];
        c.read(u64::from(ptr), &mut hdr);
        ids.push((ptr, hdr[0]));
        ptr = hdr[1];
    }
    assert_eq!(
        ids,
        vec![
            (0x40, 0x01),
            (0x48, 0x05),
            (0x60, 0x11),
            (0x6c, 0x10),
            (0xa8, 0x09)
        ]
    );
    assert_eq!(c.find_capability(Capability::ID_PM), Some(0x40));
    assert_eq!(c.find_capability(Capability::ID_MSIX), Some(0x60));
    assert_eq!(c.find_capability(Capability::ID_PCIE), Some(0x6c));
    assert_eq!(c.find_capability(0x0d), None);
    // Vendor capability: length byte covers the header, payload follows.
    let mut v = [0u8; 6];
    c.read(0xa8, &mut v);
    assert_eq!(v, [0x09, 0x00, 0x06, 0xaa, 0xbb, 0xcc]);
}

#[test]
fn msix_control_bits_only() {
    let mut c = full();
    let off = u64::from(c.find_capability(Capability::ID_MSIX).unwrap());
    assert_eq!(c.read_u16(off + 2), 69, "table size - 1");
    assert_eq!(rd32(&c, off + 4), 2, "table at BAR 2 offset 0");
    assert_eq!(rd32(&c, off + 8), 0x2002, "PBA at BAR 2 offset 0x2000");
    assert_eq!(c.msix_control(), Some((false, false)));
    let w = wr16(&mut c, off + 2, 0xffff);
    assert!(w.msix && !w.msi);
    assert_eq!(c.read_u16(off + 2), 0xc000 | 69);
    assert_eq!(c.msix_control(), Some((true, true)));
    c.write(off + 3, &[0x80]);
    assert_eq!(c.msix_control(), Some((true, false)));
    // Table and PBA offsets are read-only.
    assert!(wr32(&mut c, off + 4, 0x1234_5678).is_empty());
    assert!(wr32(&mut c, off + 8, 0x1234_5678).is_empty());
    assert_eq!(rd32(&c, off + 4), 2);
}

#[test]
fn msi_semantics() {
    let mut c = full();
    let off = u64::from(c.find_capability(Capability::ID_MSI).unwrap());
    // 64-bit, per-vector mask, 4 vectors capable (MMC = 2).
    assert_eq!(c.read_u16(off + 2), 0x0184);
    let w = wr16(&mut c, off + 2, 0xffff);
    assert!(w.msi);
    assert_eq!(
        c.read_u16(off + 2),
        0x01a5,
        "MME clamped to MMC, enable set"
    );
    wr32(&mut c, off + 4, 0xfee0_0003);
    wr32(&mut c, off + 8, 0x1);
    wr32(&mut c, off + 12, 0xffff_4041);
    wr32(&mut c, off + 16, 0xffff_ffff);
    let s = c.msi_state().unwrap();
    assert_eq!(
        s,
        MsiState {
            enabled: true,
            address: 0x1_fee0_0000,
            data: 0x4041,
            vectors: 4,
            capable: 4,
            mask: 0xf,
        }
    );
    assert!(s.masked(3) && !s.masked(4));
    // Pending bits are read-only to software but the device may set them.
    wr32(&mut c, off + 20, 0xffff_ffff);
    assert_eq!(rd32(&c, off + 20), 0);
    c.set_msi_pending(0x2);
    assert_eq!(rd32(&c, off + 20), 0x2);
    // MME = 1 (2 vectors) is within capability and kept.
    wr16(&mut c, off + 2, 0x0011);
    assert_eq!(c.msi_state().unwrap().vectors, 2);
    // A 32-bit MSI without masking: data right after the address.
    let mut m = ConfigSpace::builder(1, 2)
        .capability(Capability::Msi {
            vectors: 1,
            addr64: false,
            per_vector_mask: false,
        })
        .build()
        .unwrap();
    wr16(&mut m, 0x42, 0x0071);
    assert_eq!(m.read_u16(0x42), 0x0001, "MMC = 0: MME stays 0");
    wr32(&mut m, 0x44, 0xfee0_1000);
    wr32(&mut m, 0x48, 0xffff_0022);
    let s = m.msi_state().unwrap();
    assert_eq!((s.address, s.data, s.mask), (0xfee0_1000, 0x22, 0));
    assert_eq!(
        rd32(&m, 0x48),
        0x22,
        "upper 16 bits past the capability are RO"
    );
}

#[test]
fn power_management() {
    let mut c = full();
    let off = u64::from(c.find_capability(Capability::ID_PM).unwrap());
    assert_eq!(c.read_u16(off + 2), 0x0003);
    assert_eq!(c.pm_state(), 0);
    let w = wr16(&mut c, off + 4, 0x0003);
    assert!(w.pm);
    assert_eq!(c.pm_state(), 3);
    assert_eq!(c.read_u16(off + 4), 0x000b, "No_Soft_Reset stays set");
    // D1 and D2 are unsupported: the write is discarded.
    assert!(wr16(&mut c, off + 4, 0x0001).is_empty());
    assert_eq!(c.pm_state(), 3);
    wr16(&mut c, off + 4, 0x0000);
    assert_eq!(c.pm_state(), 0);
    // PME status is RW1C; writing one to a clear bit changes nothing.
    c.data[(off + 5) as usize] |= 0x80;
    wr16(&mut c, off + 4, 0x8000);
    assert_eq!(c.read_u16(off + 4), 0x0008);
}

#[test]
fn pcie_capability() {
    let mut c = full();
    let off = u64::from(c.find_capability(Capability::ID_PCIE).unwrap());
    assert_eq!(c.read_u16(off + 2), 0x0002, "v2 endpoint");
    assert_eq!(c.read_u16(off + 8), 0x2810);
    let w = wr16(&mut c, off + 8, 0xffff);
    assert!(w.pcie);
    assert_eq!(
        c.read_u16(off + 8),
        0x79ff,
        "no FLR, phantom or aux power bits"
    );
    c.data[(off + 10) as usize] = 0x0f;
    wr16(&mut c, off + 10, 0x0005);
    assert_eq!(c.read_u16(off + 10), 0x000a);
    wr16(&mut c, off + 0x10, 0xffff);
    assert_eq!(c.read_u16(off + 0x10), 0x00cb);
    assert_eq!(c.read_u16(off + 0x12), 0x1011, "2.5 GT/s x1");
    assert!(wr32(&mut c, off + 0x0c, 0).is_empty(), "link caps are RO");
    // Latency timer is hardwired for PCIe functions.
    c.write(0x0d, &[0x40]);
    assert_eq!(c.read_u16(0x0c) >> 8, 0);
}

#[test]
fn bytewise_and_unaligned_access_equal_dword_access() {
    let mut a = full();
    let mut b = full();
    let values: Vec<(u64, u32)> = vec![
        (0x04, 0xffff_0547),
        (0x10, 0xffff_ffff),
        (0x18, 0x1234_5678),
        (0x1c, 0x9abc_def0),
        (0x30, 0xffff_ffff),
        (0x3c, 0x0000_000b),
        (0x44, 0x0071_0000),
        (0x4c, 0xfee0_0000),
        (0x60, 0xc000_0000),
    ];
    for &(off, v) in &values {
        wr32(&mut a, off, v);
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            b.write(off + i as u64, &[*byte]);
        }
    }
    let mut da = vec![0u8; 256];
    let mut db = vec![0u8; 256];
    a.read(0, &mut da);
    b.read(0, &mut db);
    assert_eq!(da, db);
    // Unaligned reads straddling registers match the dword view.
    for off in 0..253u64 {
        let mut x = [0u8; 3];
        a.read(off, &mut x);
        assert_eq!(&x[..], &da[off as usize..off as usize + 3]);
    }
    // An unaligned write across the BAR 0/BAR 1 boundary acts per byte.
    let mut c = full();
    c.write(0x12, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(rd32(&c, 0x10), 0xffff_0000);
    assert_eq!(rd32(&c, 0x14), 0x0000_ffe1);
}

#[test]
fn out_of_range_accesses_never_panic() {
    let mut c = full();
    let mut buf = [0u8; 8];
    c.read(0xfc, &mut buf);
    assert_eq!(&buf[4..], &[0xff; 4]);
    c.read(u64::MAX, &mut buf);
    assert_eq!(buf, [0xff; 8]);
    assert!(c.write(u64::MAX - 2, &[1; 8]).is_empty());
    assert!(c.write(0x1000, &[1; 8]).is_empty());
    let big = vec![0xffu8; 10000];
    c.write(0, &big);
    let mut all = vec![0u8; 300];
    c.read(0, &mut all);
    assert_eq!(c.read_u16(0), 0x1af4);
    // Extended space: 4096 bytes, the extended capability header at 0x100 reads 0.
    let mut e = ConfigSpace::builder(1, 2)
        .capability(Capability::PciExpress)
        .extended(true)
        .build()
        .unwrap();
    assert_eq!(e.size(), 4096);
    assert_eq!(rd32(&e, 0x100), 0);
    wr32(&mut e, 0x100, 0xffff_ffff);
    assert_eq!(rd32(&e, 0x100), 0);
    assert_eq!(rd32(&e, 0xffc), 0);
    assert_eq!(e.read_u16(0xfff), 0xff00);
}

#[test]
fn reset_restores_the_built_state() {
    let mut c = full();
    let mut before = vec![0u8; 256];
    c.read(0, &mut before);
    let big = vec![0xffu8; 256];
    c.write(0, &big);
    c.set_intx_status(true);
    let mut mid = vec![0u8; 256];
    c.read(0, &mut mid);
    assert_ne!(before, mid);
    c.reset();
    let mut after = vec![0u8; 256];
    c.read(0, &mut after);
    assert_eq!(before, after);
}

#[test]
fn builder_rejects_invalid_descriptions() {
    let b = || ConfigSpace::builder(1, 2);
    assert_eq!(
        b().bar(6, Bar::mem32(16)).build().unwrap_err(),
        ConfigError::BarIndex(6)
    );
    assert_eq!(
        b().bar(5, Bar::mem64(16)).build().unwrap_err(),
        ConfigError::BarIndex(5)
    );
    assert!(matches!(
        b().bar(0, Bar::mem32(24)).build(),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        b().bar(0, Bar::mem32(8)).build(),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        b().bar(0, Bar::io(2)).build(),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        b().bar(0, Bar::io(512)).build(),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        b().bar(0, Bar::mem32(1 << 32)).build(),
        Err(ConfigError::BarSize { .. })
    ));
    assert!(matches!(
        b().bar(0, Bar::mem64(0)).build(),
        Err(ConfigError::BarSize { .. })
    ));
    assert_eq!(
        b().bar(0, Bar::io(4).prefetchable()).build().unwrap_err(),
        ConfigError::PrefetchableIo(0)
    );
    assert_eq!(
        b().bar(0, Bar::mem64(16))
            .bar(1, Bar::mem32(16))
            .build()
            .unwrap_err(),
        ConfigError::BarOverlap(1)
    );
    assert_eq!(
        b().bar(2, Bar::mem32(16))
            .bar(1, Bar::mem64(16))
            .build()
            .unwrap_err(),
        ConfigError::BarOverlap(1)
    );
    assert_eq!(
        b().rom(1024).build().unwrap_err(),
        ConfigError::RomSize(1024)
    );
    assert_eq!(
        b().interrupt_pin(5).build().unwrap_err(),
        ConfigError::InterruptPin(5)
    );
    let msi = |vectors| Capability::Msi {
        vectors,
        addr64: false,
        per_vector_mask: false,
    };
    for v in [0, 3, 64] {
        assert!(matches!(
            b().capability(msi(v)).build(),
            Err(ConfigError::InvalidCapability { .. })
        ));
    }
    assert_eq!(
        b().capability(msi(1))
            .capability(msi(2))
            .build()
            .unwrap_err(),
        ConfigError::DuplicateCapability("MSI")
    );
    let msix = |table_size, table_bar, table_offset, pba_bar, pba_offset| Capability::Msix {
        table_size,
        table_bar,
        table_offset,
        pba_bar,
        pba_offset,
    };
    let with_bars = || {
        b().bar(0, Bar::mem32(0x1000))
            .bar(1, Bar::io(16))
            .bar(2, Bar::mem64(0x1000))
    };
    assert!(with_bars()
        .capability(msix(8, 0, 0, 0, 0x800))
        .build()
        .is_ok());
    for (cap, bar) in [
        (msix(8, 5, 0, 0, 0x800), 5), // absent
        (msix(8, 1, 0, 0, 0x800), 1), // I/O
        (msix(8, 3, 0, 0, 0x800), 3), // upper half
        (msix(8, 0, 0, 9, 0x800), 9), // out of range
    ] {
        assert!(
            matches!(with_bars().capability(cap).build(), Err(ConfigError::MsixBar { bar: got, .. }) if got == bar)
        );
    }
    for cap in [msix(0, 0, 0, 0, 0x800), msix(2049, 0, 0, 0, 0x800)] {
        assert!(matches!(
            with_bars().capability(cap).build(),
            Err(ConfigError::InvalidCapability { .. })
        ));
    }
    for cap in [
        msix(8, 0, 4, 0, 0x800),   // misaligned
        msix(257, 0, 0, 2, 0),     // table runs past the 4 KiB BAR
        msix(8, 0, 0, 0, 0x40),    // PBA overlaps the table
        msix(8, 0, 0, 0, 0xffc),   // misaligned PBA
        msix(64, 0, 0, 0, 0x1000), // PBA past the end
    ] {
        assert!(
            matches!(
                with_bars().capability(cap.clone()).build(),
                Err(ConfigError::MsixRange { .. })
            ),
            "{cap:?}"
        );
    }
    let fat = Capability::Vendor(vec![0; 252]);
    assert!(matches!(
        b().capability(fat).build(),
        Err(ConfigError::CapabilitiesTooLarge { .. })
    ));
    assert!(matches!(
        b().capability(Capability::Vendor(vec![0; 253])).build(),
        Err(ConfigError::InvalidCapability { .. })
    ));
    // Exactly filling the capability area is fine.
    assert!(b()
        .capability(Capability::Vendor(vec![0; 189]))
        .build()
        .is_ok());
    assert!(matches!(
        b().capability(Capability::Vendor(vec![0; 190])).build(),
        Err(ConfigError::CapabilitiesTooLarge { .. })
    ));
}
