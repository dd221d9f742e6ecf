//! The common configuration structure of a virtio-pci function (virtio 1.2 section
//! 4.1.4.3): feature negotiation, the device status state machine (section 2.1), the
//! per-queue registers, and starting a queue on the [`VirtioDevice`] once the driver
//! set DRIVER_OK (section 3.1.1) or enabled the queue after it. A driver reset (status
//! 0) stops everything and forgets the negotiation; PCI state is kept.
//!
//! [`VirtioDevice`]: crate::virtio::VirtioDevice

use std::sync::atomic::Ordering;

use log::{info, warn};

use super::{status, VirtioPci, COMMON_LEN, NO_VECTOR, VIRTIO_F_VERSION_1};
use crate::virtio::device::QueueConfig;
use crate::virtio::spec;

/// One queue's registers as the driver programmed them (4.1.4.3: queue_size ...
/// queue_device), and whether the device runs it.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct QueueRegs {
    pub(super) size: u16,
    pub(super) vector: u16,
    pub(super) enabled: bool,
    pub(super) desc: u64,
    pub(super) driver: u64,
    pub(super) device: u64,
    pub(super) running: bool,
}

impl VirtioPci {
    /// The device's features plus VIRTIO_F_VERSION_1, which a modern device offers.
    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// Driver reset (status 0): stop queues, forget negotiation, keep PCI state.
    pub(super) fn reset_virtio(&mut self) {
        self.device.reset();
        let nq = self.device.num_queues();
        let max = self.device.max_queue_size();
        self.queues = vec![
            QueueRegs {
                size: max,
                vector: NO_VECTOR,
                ..QueueRegs::default()
            };
            nq
        ];
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.router.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        self.status = 0;
        self.queue_select = 0;
        self.router.isr.store(0, Ordering::SeqCst);
        self.irqs.set_intx_level(false);
        for k in &self.kicks {
            let _ = k.read();
        }
        {
            let mut r = self.router.lock();
            r.vectors = vec![NO_VECTOR; nq];
        }
        self.router.refresh();
    }

    /// A driver write of device_status, by the rules every transport shares
    /// ([`spec::write_status`]): 0 resets; FEATURES_OK is kept only for a subset of the
    /// offered features that includes VERSION_1 (and hands them to the device); DRIVER_OK
    /// starts the enabled queues; FAILED stops them.
    fn set_status(&mut self, written: u8) {
        let offered = self.offered_features();
        let driver = self.driver_features;
        let update = spec::write_status(self.status, written, offered, || Ok(driver));
        if update.reset {
            info!("{}: driver reset", self.name);
            self.reset_virtio();
            return;
        }
        if let Some(why) = &update.refused {
            warn!("{}: device status {written:#x}: {why}", self.name);
        }
        if let Some(features) = update.features {
            self.device.set_driver_features(features);
        }
        self.status = update.status;
        if update.start {
            for q in 0..self.queues.len() {
                if self.queues[q].enabled {
                    self.start_queue(q);
                }
            }
        } else if update.stop {
            self.stop_queues();
        }
    }

    /// Stop every running queue (the driver gave up: FAILED); the device keeps its
    /// negotiation until the driver resets it.
    fn stop_queues(&mut self) {
        for q in 0..self.queues.len() {
            if self.queues[q].running {
                self.device.stop_queue(q);
                self.queues[q].running = false;
            }
        }
    }

    /// Hand queue `q` to the device (DEVICE_NEEDS_RESET when the relay or the device
    /// refuses).
    fn start_queue(&mut self, q: usize) {
        if let Err(e) = self.ensure_relay() {
            warn!(
                "{}: cannot start the interrupt relay: {}",
                self.name,
                crate::limits::describe(&e)
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let regs = self.queues[q];
        let kick = match self.kicks[q].try_clone() {
            Ok(k) => k,
            Err(e) => {
                warn!("{}: queue {q}: {}", self.name, crate::limits::describe(&e));
                return;
            }
        };
        self.dma.publish();
        let cfg = QueueConfig {
            size: regs.size,
            desc: regs.desc,
            avail: regs.driver,
            used: regs.device,
            kick,
            call: self.router.call_fd(q),
            next_avail: 0,
            next_used: 0,
        };
        match self.device.start_queue(q, cfg) {
            Ok(()) => self.queues[q].running = true,
            Err(e) => {
                warn!("{}: cannot start queue: {e}; device needs reset", self.name);
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    /// The queue queue_select names, if it exists.
    fn selected(&self) -> Option<usize> {
        let q = self.queue_select as usize;
        (q < self.queues.len()).then_some(q)
    }

    /// The common configuration structure as bytes (virtio 1.2 4.1.4.3).
    pub(super) fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let feat = match self.device_feature_select {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        };
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&feat.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&drv.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.config_vector.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        // A device whose backend failed needs a reset, whatever the driver did since.
        let failed = self.device.health().is_some_and(|h| h.is_failed());
        b[0x14] = self.status
            | if failed {
                status::DEVICE_NEEDS_RESET
            } else {
                0
            };
        b[0x15] = self.config_generation;
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let r = &self.queues[q];
            b[0x18..0x1a].copy_from_slice(&r.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&r.vector.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(r.enabled).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&(q as u16).to_le_bytes());
            b[0x20..0x28].copy_from_slice(&r.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&r.driver.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&r.device.to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&(q as u16).to_le_bytes());
        }
        b
    }

    /// A driver write of `data` at `offset` in the common configuration structure.
    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let before = self.common_image();
        let mut img = before;
        let start = offset as usize;
        let end = (start + data.len()).min(img.len());
        if start >= end {
            return;
        }
        img[start..end].copy_from_slice(&data[..end - start]);
        let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let touched = |o: usize, len: usize| start < o + len && o < end;
        if touched(0x00, 4) {
            self.device_feature_select = u32_at(&img, 0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = u32_at(&img, 0x08);
        }
        if touched(0x0c, 4) {
            let v = u64::from(u32_at(&img, 0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touched(0x10, 2) {
            self.config_vector = self.valid_vector(u16_at(&img, 0x10));
            self.router
                .config_vector
                .store(self.config_vector, Ordering::SeqCst);
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(&img, 0x16);
        }
        if let Some(q) = self.selected() {
            // Queue registers are read-only while the queue runs (except enable).
            let running = self.queues[q].running;
            if touched(0x18, 2) && !running {
                self.queues[q].size = u16_at(&img, 0x18);
            }
            if touched(0x1a, 2) {
                let v = self.valid_vector(u16_at(&img, 0x1a));
                self.queues[q].vector = v;
                self.router.lock().vectors[q] = v;
                self.router.device.set_queue_call(q, self.router.call_fd(q));
            }
            if touched(0x20, 8) && !running {
                self.queues[q].desc = u64_at(&img, 0x20);
            }
            if touched(0x28, 8) && !running {
                self.queues[q].driver = u64_at(&img, 0x28);
            }
            if touched(0x30, 8) && !running {
                self.queues[q].device = u64_at(&img, 0x30);
            }
            if touched(0x1c, 2) && u16_at(&img, 0x1c) == 1 && !self.queues[q].enabled {
                self.queues[q].enabled = true;
                if spec::is_running(self.status) {
                    self.start_queue(q);
                }
            }
        }
        // Status last: a write that sets queue registers and status together sees them.
        if touched(0x14, 1) && img[0x14] != before[0x14] {
            self.set_status(img[0x14]);
        } else if touched(0x14, 1) && img[0x14] == 0 {
            self.set_status(0);
        }
    }

    /// `v` if the MSI-X table has it, else NO_VECTOR (4.1.5.1.2).
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.queues.len() as u16 + 1 {
            v
        } else {
            NO_VECTOR
        }
    }
}
