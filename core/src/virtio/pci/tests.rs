//! Unit tests of the virtio-pci function, driven through its [`PciDevice`] interface as
//! a transport would: registers, queue start, notify, interrupts, the PCI_CFG window.

use std::sync::atomic::Ordering;
use std::sync::Mutex as StdMutex;

use super::*;
use crate::irq::IrqKind;
use crate::virtio::device::QueueConfig;

/// A VirtioDevice that records what the transport asked of it.
#[derive(Default)]
struct Recorder {
    log: StdMutex<Vec<String>>,
    kicks: StdMutex<Vec<Option<EventFd>>>,
    calls: StdMutex<Vec<Option<EventFd>>>,
    fail_start: bool,
}

impl Recorder {
    fn events(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
}

impl VirtioDevice for Recorder {
    fn device_type(&self) -> u32 {
        2
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        (1 << 29) | (1 << 6)
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as usize + i) as u8;
        }
    }
    fn write_config(&self, offset: u32, data: &[u8]) {
        self.push(format!("config {offset} {data:?}"));
    }
    fn set_driver_features(&self, features: u64) {
        self.push(format!("features {features:#x}"));
    }
    fn start_queue(&self, index: usize, c: QueueConfig) -> Result<(), super::super::QueueError> {
        if self.fail_start {
            return Err(super::super::QueueError::BadRings(index));
        }
        self.push(format!(
            "start {index} size {} {:#x} {:#x} {:#x}",
            c.size, c.desc, c.avail, c.used
        ));
        let mut k = self.kicks.lock().unwrap();
        k.resize_with(2, || None);
        k[index] = Some(c.kick);
        Ok(())
    }
    fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
        let mut c = self.calls.lock().unwrap();
        c.resize_with(2, || None);
        c[index] = call;
    }
    fn stop_queue(&self, index: usize) -> Option<u16> {
        self.push(format!("stop {index}"));
        Some(0)
    }
    fn reset(&self) {
        self.push("reset".into());
    }
}

fn make(fail_start: bool) -> (VirtioPci, Arc<Recorder>) {
    let rec = Arc::new(Recorder {
        fail_start,
        ..Recorder::default()
    });
    let pci = VirtioPci::new(
        "test",
        rec.clone(),
        Arc::new(DmaSpace::default()),
        VirtioPciOptions::default(),
    )
    .unwrap();
    (pci, rec)
}

const BAR: PciRegion = PciRegion::Bar(VIRTIO_BAR);

fn w8(p: &mut VirtioPci, off: u64, v: u8) {
    p.write(BAR, off, &[v]).unwrap();
}
fn w16(p: &mut VirtioPci, off: u64, v: u16) {
    p.write(BAR, off, &v.to_le_bytes()).unwrap();
}
fn w32(p: &mut VirtioPci, off: u64, v: u32) {
    p.write(BAR, off, &v.to_le_bytes()).unwrap();
}
fn r8(p: &mut VirtioPci, off: u64) -> u8 {
    let mut b = [0u8; 1];
    p.read(BAR, off, &mut b).unwrap();
    b[0]
}
fn r16(p: &mut VirtioPci, off: u64) -> u16 {
    let mut b = [0u8; 2];
    p.read(BAR, off, &mut b).unwrap();
    u16::from_le_bytes(b)
}
fn r32(p: &mut VirtioPci, off: u64) -> u32 {
    let mut b = [0u8; 4];
    p.read(BAR, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn negotiate(p: &mut VirtioPci, high: u32) {
    w8(p, 0x14, status::ACKNOWLEDGE | status::DRIVER);
    w32(p, 0x08, 1);
    w32(p, 0x0c, high);
    w8(
        p,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

#[test]
fn identity_and_capabilities() {
    let (mut p, _) = make(false);
    let mut id = [0u8; 4];
    p.read(PciRegion::Config, 0, &mut id).unwrap();
    assert_eq!(
        id,
        [0xf4, 0x1a, 0x42, 0x10],
        "1af4:1042 is a modern virtio-blk"
    );
    for t in [CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG] {
        let off = find_vendor_cap(&p.config, t).expect("vendor cap present");
        let mut cap = [0u8; 16];
        p.read(PciRegion::Config, u64::from(off), &mut cap).unwrap();
        if t != CAP_PCI_CFG {
            assert_eq!(cap[4], VIRTIO_BAR);
        }
    }
    assert!(p.config.find_capability(Capability::ID_MSIX).is_some());
    assert_eq!(
        p.region_info(PciRegion::Bar(VIRTIO_BAR)).size,
        VIRTIO_BAR_SIZE
    );
    assert!(p.region_info(PciRegion::Bar(VIRTIO_BAR)).mmap.is_none());
    assert_eq!(p.region_info(PciRegion::Bar(0)).size, 0);
}

#[test]
fn features_need_version_1_and_a_subset() {
    let (mut p, rec) = make(false);
    // Offered: EVENT_IDX and bit 6, plus VERSION_1.
    w32(&mut p, 0x00, 0);
    assert_eq!(r32(&mut p, 0x04), (1 << 29) | (1 << 6));
    w32(&mut p, 0x00, 1);
    assert_eq!(r32(&mut p, 0x04), 1);
    // Without VERSION_1: FEATURES_OK does not stick.
    negotiate(&mut p, 0);
    assert_eq!(r8(&mut p, 0x14) & status::FEATURES_OK, 0);
    // Reset, then accept properly.
    w8(&mut p, 0x14, 0);
    assert_eq!(r8(&mut p, 0x14), 0);
    w32(&mut p, 0x08, 0);
    w32(&mut p, 0x0c, 1 << 29);
    negotiate(&mut p, 1);
    assert_ne!(r8(&mut p, 0x14) & status::FEATURES_OK, 0);
    assert!(rec
        .events()
        .contains(&format!("features {:#x}", (1u64 << 32) | (1 << 29))));
    // A feature the device does not offer is refused.
    w8(&mut p, 0x14, 0);
    w32(&mut p, 0x08, 0);
    w32(&mut p, 0x0c, 1 << 3);
    negotiate(&mut p, 1);
    assert_eq!(r8(&mut p, 0x14) & status::FEATURES_OK, 0);
}

#[test]
fn queues_start_at_driver_ok_and_notify_kicks() {
    let (mut p, rec) = make(false);
    negotiate(&mut p, 1);
    assert_eq!(r16(&mut p, 0x12), 2, "num_queues");
    w16(&mut p, 0x16, 5);
    assert_eq!(
        r16(&mut p, 0x18),
        0,
        "a queue that does not exist has size 0"
    );
    w16(&mut p, 0x16, 1);
    assert_eq!(r16(&mut p, 0x18), 256);
    w16(&mut p, 0x18, 64);
    w32(&mut p, 0x20, 0x1000);
    w32(&mut p, 0x24, 0x1);
    w32(&mut p, 0x28, 0x2000);
    w32(&mut p, 0x30, 0x3000);
    w16(&mut p, 0x1a, 2);
    assert_eq!(r16(&mut p, 0x1a), 2);
    w16(&mut p, 0x1a, 99);
    assert_eq!(
        r16(&mut p, 0x1a),
        NO_VECTOR,
        "an impossible vector reads NO_VECTOR"
    );
    w16(&mut p, 0x1c, 1);
    assert!(
        !rec.events().iter().any(|e| e.starts_with("start")),
        "not before DRIVER_OK"
    );
    w8(
        &mut p,
        0x14,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(rec
        .events()
        .contains(&"start 1 size 64 0x100001000 0x2000 0x3000".to_string()));
    // Notify for queue 1 at notify offset 1 * multiplier.
    p.write(BAR, NOTIFY + 4, &1u16.to_le_bytes()).unwrap();
    let kick = rec.kicks.lock().unwrap()[1]
        .as_ref()
        .unwrap()
        .read()
        .unwrap();
    assert_eq!(kick, 1);
    // Queue 0 was never enabled: its notify is ignored, not an error.
    p.write(BAR, NOTIFY, &0u16.to_le_bytes()).unwrap();
    // Device reset stops everything and clears registers.
    w8(&mut p, 0x14, 0);
    assert!(rec.events().contains(&"reset".to_string()));
    w16(&mut p, 0x16, 1);
    assert_eq!(r16(&mut p, 0x1c), 0);
}

#[test]
fn a_queue_that_cannot_start_sets_needs_reset() {
    let (mut p, _) = make(true);
    negotiate(&mut p, 1);
    w16(&mut p, 0x16, 0);
    w16(&mut p, 0x1c, 1);
    w8(&mut p, 0x14, 0x0f);
    assert_ne!(r8(&mut p, 0x14) & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn device_config_and_pci_cfg_window() {
    let (mut p, rec) = make(false);
    assert_eq!(r32(&mut p, DEVICE + 4), u32::from_le_bytes([4, 5, 6, 7]));
    // The device model (virtio::config): a block device's writeback reaches the backend,
    // its read-only size_max does not.
    p.write(BAR, DEVICE + 32, &[1]).unwrap();
    assert!(rec.events().contains(&"config 32 [1]".to_string()));
    p.write(BAR, DEVICE + 8, &[9]).unwrap();
    assert!(!rec.events().iter().any(|e| e.starts_with("config 8")));
    // Read num_queues (common cfg 0x12) through the PCI_CFG window.
    let cap = u64::from(p.pci_cfg_cap.unwrap());
    p.write(PciRegion::Config, cap + 4, &[VIRTIO_BAR]).unwrap();
    p.write(PciRegion::Config, cap + 8, &0x12u32.to_le_bytes())
        .unwrap();
    p.write(PciRegion::Config, cap + 12, &2u32.to_le_bytes())
        .unwrap();
    let mut v = [0u8; 2];
    p.read(PciRegion::Config, cap + 16, &mut v).unwrap();
    assert_eq!(u16::from_le_bytes(v), 2);
    // An access that straddles two structures is refused, not misrouted.
    assert!(p.read(BAR, ISR - 2, &mut [0u8; 4]).is_err());
    assert!(p.read(BAR, VIRTIO_BAR_SIZE - 2, &mut [0u8; 4]).is_err());
}

#[test]
fn isr_read_clears_and_lowers_intx() {
    let (mut p, _) = make(false);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    p.irqs
        .set_eventfds(IrqKind::Intx, 0, vec![Some(efd.try_clone().unwrap())])
        .unwrap();
    // MSI-X is off: a queue completion goes through the relay to ISR + INTx (its
    // thread starts with the first queue; start it as a running queue would).
    p.ensure_relay().unwrap();
    p.router.relay_fds[0].write(1).unwrap();
    let mut waited = 0;
    while p.router.isr.load(Ordering::SeqCst) == 0 && waited < 200 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        waited += 1;
    }
    assert_eq!(efd.read().unwrap(), 1, "INTx fired");
    assert_eq!(r8(&mut p, ISR), 1);
    assert_eq!(r8(&mut p, ISR), 0, "reading clears");
    assert!(!p.irqs.intx_level());
}

#[test]
fn dropping_the_function_releases_the_virtio_device() {
    let (p, rec) = make(false);
    assert!(Arc::strong_count(&rec) > 1);
    drop(p);
    assert_eq!(
        Arc::strong_count(&rec),
        1,
        "no reference cycle keeps the device alive"
    );
}

#[test]
fn with_msix_enabled_the_vector_eventfd_is_the_call_fd() {
    let (mut p, rec) = make(false);
    let msix = u64::from(p.config.find_capability(Capability::ID_MSIX).unwrap());
    p.write(PciRegion::Config, msix + 3, &[0x80]).unwrap(); // MSI-X enable
    w16(&mut p, 0x16, 0);
    w16(&mut p, 0x1a, 1);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    p.irqs
        .set_eventfds(IrqKind::Msix, 1, vec![Some(efd.try_clone().unwrap())])
        .unwrap();
    let call = rec.calls.lock().unwrap()[0]
        .as_ref()
        .unwrap()
        .try_clone()
        .unwrap();
    call.write(1).unwrap();
    assert_eq!(
        efd.read().unwrap(),
        1,
        "the backend's signal reached the vector's eventfd directly"
    );
}

/// The device status follows the rules every transport shares (`virtio::spec`):
/// DRIVER_OK without FEATURES_OK starts nothing and is not kept, a driver cannot clear
/// bits without a reset, FAILED stops the running queues.
#[test]
fn status_writes_follow_the_shared_rules() {
    use status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
    let (mut p, rec) = make(false);
    w8(&mut p, 0x14, ACKNOWLEDGE | DRIVER);
    w32(&mut p, 0x08, 1);
    w32(&mut p, 0x0c, 1);
    w16(&mut p, 0x16, 0);
    w32(&mut p, 0x20, 0x1000);
    w32(&mut p, 0x28, 0x2000);
    w32(&mut p, 0x30, 0x3000);
    w16(&mut p, 0x1c, 1);
    w8(&mut p, 0x14, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(r8(&mut p, 0x14), ACKNOWLEDGE | DRIVER, "DRIVER_OK not kept");
    assert!(!rec.events().iter().any(|e| e.starts_with("start")));
    let running = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    w8(&mut p, 0x14, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    w8(&mut p, 0x14, running);
    assert_eq!(r8(&mut p, 0x14), running);
    assert!(rec.events().iter().any(|e| e.starts_with("start 0")));
    // Clearing bits without a reset: they stay set, nothing stops.
    w8(&mut p, 0x14, ACKNOWLEDGE);
    assert_eq!(r8(&mut p, 0x14), running);
    assert!(!rec.events().iter().any(|e| e.starts_with("stop")));
    // FAILED: the driver gave up; the queues stop, the status shows it.
    w8(&mut p, 0x14, running | FAILED);
    assert_eq!(r8(&mut p, 0x14), running | FAILED);
    assert!(
        rec.events().contains(&"stop 0".to_string()),
        "{:?}",
        rec.events()
    );
    // Enabling another queue now starts nothing: the device does not run.
    w16(&mut p, 0x16, 1);
    w16(&mut p, 0x1c, 1);
    assert!(!rec.events().iter().any(|e| e.starts_with("start 1")));
}
