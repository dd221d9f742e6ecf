//! Interrupt routing of a virtio-pci function: which eventfd a queue's backend signals,
//! the ISR status byte (virtio 1.2 section 4.1.4.5), MSI-X vector assignment (section
//! 4.1.5.1.2) and the MSI-X table BAR, and the relay thread.
//!
//! While MSI-X is enabled, a queue with a vector signals the eventfd the client attached
//! to that vector directly. Otherwise it signals a relay eventfd; the relay thread (one
//! per function, started with the first queue) sets ISR bit 0, then raises INTx or, with
//! MSI-X on, signals the queue's vector through the MSI-X table (which sets its pending
//! bit while it is masked). Vector eventfds the client attaches or replaces later reach
//! the queues at once.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use log::warn;
use vmm_sys_util::eventfd::EventFd;

use super::{VirtioPci, NO_VECTOR, PBA_OFFSET};
use crate::dispatch::{Control, EventLoop};
use crate::irq::{Interrupts, IrqKind};
use crate::pci::Msix;
use crate::sandbox;
use crate::sync::lock;
use crate::virtio::device::VirtioDevice;

/// Interrupt routing shared with the eventfd listener and the relay thread.
pub(super) struct Router {
    pub(super) device: Arc<dyn VirtioDevice>,
    pub(super) irqs: Arc<Interrupts>,
    pub(super) msix: Arc<Mutex<Msix>>,
    pub(super) isr: Arc<AtomicU8>,
    /// The configuration-change vector (`config_msix_vector`), for a change the device
    /// announces on its own (DEVICE_NEEDS_RESET after a backend failure).
    pub(super) config_vector: AtomicU16,
    pub(super) route: Mutex<Route>,
    pub(super) relay_fds: Vec<EventFd>,
}

/// What decides where a queue's signal goes.
#[derive(Default)]
pub(super) struct Route {
    pub(super) msix_enabled: bool,
    pub(super) intx_disabled: bool,
    pub(super) vectors: Vec<u16>,
}

impl Router {
    /// Routing for one queue per eventfd in `relay_fds`, none with a vector yet. The
    /// router follows the vector eventfds the client attaches to `irqs` from then on.
    pub(super) fn new(
        device: Arc<dyn VirtioDevice>,
        irqs: Arc<Interrupts>,
        msix: Arc<Mutex<Msix>>,
        relay_fds: Vec<EventFd>,
    ) -> Arc<Router> {
        let nq = relay_fds.len();
        let router = Arc::new(Router {
            device,
            irqs: irqs.clone(),
            msix,
            isr: Arc::new(AtomicU8::new(0)),
            config_vector: AtomicU16::new(NO_VECTOR),
            route: Mutex::new(Route {
                vectors: vec![NO_VECTOR; nq],
                ..Route::default()
            }),
            relay_fds,
        });
        // Vector eventfds attached or replaced by the client reach the queues at once.
        // A weak reference: the router owns the device and must die with the function.
        let r = Arc::downgrade(&router);
        irqs.subscribe(Arc::new(move |kind| {
            if let (IrqKind::Msix, Some(r)) = (kind, r.upgrade()) {
                r.refresh();
            }
        }));
        router
    }

    /// The routing state (a poisoned lock is used all the same).
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Route> {
        lock(&self.route)
    }

    /// The fd a queue's backend should signal.
    pub(super) fn call_fd(&self, queue: usize) -> Option<EventFd> {
        let direct = {
            let r = self.lock();
            let v = r.vectors.get(queue).copied().unwrap_or(NO_VECTOR);
            if r.msix_enabled && v != NO_VECTOR {
                self.irqs.eventfd(IrqKind::Msix, u32::from(v))
            } else {
                None
            }
        };
        direct.or_else(|| self.relay_fds.get(queue).and_then(|f| f.try_clone().ok()))
    }

    /// Hand every queue its current call fd.
    pub(super) fn refresh(&self) {
        for q in 0..self.relay_fds.len() {
            self.device.set_queue_call(q, self.call_fd(q));
        }
    }

    /// A queue signalled its relay fd: ISR bit 0, then MSI-X or INTx.
    fn relay(&self, queue: usize) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        let (msix, vector, intx_disabled) = {
            let r = self.lock();
            (
                r.msix_enabled,
                r.vectors.get(queue).copied().unwrap_or(NO_VECTOR),
                r.intx_disabled,
            )
        };
        if msix {
            if vector != NO_VECTOR {
                lock(&self.msix).signal(vector);
            }
        } else if !intx_disabled {
            self.irqs.set_intx_level(true);
        }
    }
}

impl Router {
    /// A configuration change (virtio 1.2 4.1.4.5): ISR bit 1, then the configuration
    /// vector or INTx.
    pub(super) fn config_changed(&self) {
        self.isr.fetch_or(2, Ordering::SeqCst);
        let (msix, intx_disabled) = {
            let r = self.lock();
            (r.msix_enabled, r.intx_disabled)
        };
        if msix {
            let vector = self.config_vector.load(Ordering::SeqCst);
            if vector != NO_VECTOR {
                lock(&self.msix).signal(vector);
            }
        } else if !intx_disabled {
            self.irqs.set_intx_level(true);
        }
    }
}

impl VirtioPci {
    /// The relay's event loop: one eventfd per queue, each relayed to the driver, and the
    /// device's health: a failure is announced as a configuration change (the driver
    /// then reads DEVICE_NEEDS_RESET, virtio 1.2 2.1.2).
    pub(super) fn relay_loop(router: &Arc<Router>) -> io::Result<EventLoop> {
        let mut lp = EventLoop::new()?;
        if let Some(health) = router.device.health() {
            let r = router.clone();
            lp.add(health.event_fd(), epoll::Events::EPOLLIN, move |_, _| {
                health.acknowledge();
                r.config_changed();
                Control::Continue
            })?;
        }
        for (q, fd) in router.relay_fds.iter().enumerate() {
            let r = router.clone();
            let efd = fd.try_clone()?;
            lp.add(fd.as_raw_fd(), epoll::Events::EPOLLIN, move |_, _| {
                let _ = efd.read();
                r.relay(q);
                Control::Continue
            })?;
        }
        Ok(lp)
    }

    /// Start the relay thread if it has not started yet (queues signal it only once they
    /// run; its eventfds collect signals meanwhile).
    /// It starts under the process's seccomp policy (crate::sandbox); if it could not
    /// start, every later queue start fails too.
    pub(super) fn ensure_relay(&mut self) -> io::Result<()> {
        if self.relay_thread.is_some() {
            return Ok(());
        }
        let Some(mut lp) = self.relay_loop.take() else {
            return Err(io::Error::other("the interrupt relay failed to start"));
        };
        let thread = sandbox::spawn(
            "virtio-irq-relay".into(),
            sandbox::Role::Worker,
            move || {
                if let Err(e) = lp.run() {
                    warn!("virtio interrupt relay failed: {e}");
                }
            },
        )?;
        self.relay_thread = Some(thread);
        Ok(())
    }

    /// Follow the MSI-X capability's Message Control (enable, function mask) and the
    /// Command register's INTx disable: the table learns them, and the queues' call fds
    /// change when MSI-X is switched on or off.
    pub(super) fn sync_msix_control(&mut self) {
        if let Some((enabled, masked)) = self.config.msix_control() {
            lock(&self.msix).set_control(enabled, masked);
            let changed = {
                let mut r = self.router.lock();
                let changed = r.msix_enabled != enabled;
                r.msix_enabled = enabled;
                r.intx_disabled = self.config.intx_disabled();
                changed
            };
            if changed {
                self.router.refresh();
            }
        }
    }

    /// Whether INTx is pending (reported in the Status register): ISR bits set while
    /// MSI-X is off.
    pub(super) fn intx_pending(&self) -> bool {
        let isr_pending = self.router.isr.load(Ordering::SeqCst) != 0;
        let msix_on = self.router.lock().msix_enabled;
        isr_pending && !msix_on
    }

    /// The driver reads the ISR status byte: reading clears it and lowers INTx (4.1.4.5).
    pub(super) fn isr_read(&self) -> u8 {
        let isr = self.router.isr.swap(0, Ordering::SeqCst);
        self.irqs.set_intx_level(false);
        isr
    }

    /// A read of the MSI-X BAR: the table, or the PBA from `PBA_OFFSET`.
    pub(super) fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let m = lock(&self.msix);
        if offset >= PBA_OFFSET {
            m.read_pba(offset - PBA_OFFSET, data);
        } else {
            m.read_table(offset, data);
        }
    }

    /// A write of the MSI-X BAR: the table, or the PBA from `PBA_OFFSET`.
    pub(super) fn msix_write(&self, offset: u64, data: &[u8]) {
        let mut m = lock(&self.msix);
        if offset >= PBA_OFFSET {
            m.write_pba(offset - PBA_OFFSET, data);
        } else {
            m.write_table(offset, data);
        }
    }
}
