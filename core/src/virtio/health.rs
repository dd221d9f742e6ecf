//! A backend panic costs its device only: the containment boundary, and how a transport
//! learns that its device needs a reset.
//!
//! Every call into a `VhostUserBackend` — `handle_event` on a worker, and the control
//! calls a transport makes (`get_config`, `set_config`, `update_memory`,
//! `acked_features`, `reset_device`, ...) — runs inside [`contain`]. A panic there is
//! caught: the device's [`DeviceHealth`] records why (the first failure wins; the log
//! names the device and the panic message), its workers stop calling the backend, and
//! the health's eventfd becomes readable so that the transport can tell the driver the
//! way its protocol allows — virtio-pci sets DEVICE_NEEDS_RESET and raises a
//! configuration-change interrupt (virtio 1.2 section 2.1.2), vhost-user closes the
//! connection, VDUSE stops the queues. Every other device of the process goes on. A
//! driver reset (or, over vhost-user, the next connection) clears the failure and the
//! device is tried again — it works again if the backend's own state allows.
//!
//! Unwinding must be on (the default `panic = "unwind"`): with `panic = "abort"` nothing
//! can be caught, and a backend panic ends the process.

use std::any::Any;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::sync::lock;

/// Whether a device still works; readable (as an eventfd) once it does not.
#[derive(Debug)]
pub struct DeviceHealth {
    name: Mutex<String>,
    failed: AtomicBool,
    why: Mutex<Option<String>>,
    event: EventFd,
}

impl DeviceHealth {
    /// A working device named `name` (log lines).
    pub fn new(name: impl Into<String>) -> io::Result<Self> {
        Ok(DeviceHealth {
            name: Mutex::new(name.into()),
            failed: AtomicBool::new(false),
            why: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Rename the device in log lines (a transport knows its export's name).
    pub fn set_name(&self, name: impl Into<String>) {
        *lock(&self.name) = name.into();
    }

    /// Record that the device failed; the first failure is kept (and logged), later ones
    /// are logged only. Wakes whoever watches [`event_fd`](DeviceHealth::event_fd).
    pub fn fail(&self, why: impl Into<String>) {
        let why = why.into();
        let name = lock(&self.name).clone();
        let mut slot = lock(&self.why);
        if slot.is_some() {
            log::warn!("{name}: {why} (the device already needs a reset)");
            return;
        }
        log::error!("{name}: {why}; the device needs a reset, other devices go on");
        *slot = Some(why);
        self.failed.store(true, Ordering::Release);
        drop(slot);
        if let Err(e) = self.event.write(1) {
            log::warn!("{name}: cannot signal the failure: {e}");
        }
    }

    /// Whether the device failed (cheap: workers check it on every event).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why the device failed, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.why).clone()
    }

    /// Forget the failure (the driver reset the device); the backend is tried again.
    pub fn clear(&self) {
        let mut slot = lock(&self.why);
        if slot.take().is_some() {
            log::info!("{}: reset after a failure", lock(&self.name));
        }
        self.failed.store(false, Ordering::Release);
        let _ = self.event.read();
    }

    /// An eventfd that becomes readable when the device fails (level: it stays readable
    /// until [`clear`](DeviceHealth::clear) or [`acknowledge`](DeviceHealth::acknowledge)).
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Consume the eventfd's wake-up (the watcher has acted on the failure).
    pub fn acknowledge(&self) {
        let _ = self.event.read();
    }

    /// Run `f` (a call into the backend, named `what` in the log) inside the containment
    /// boundary: its panic becomes this device's failure and `None`. A failed device is
    /// not called at all.
    pub fn call<R>(&self, what: &str, f: impl FnOnce() -> R) -> Option<R> {
        if self.is_failed() {
            return None;
        }
        match contain(f) {
            Ok(r) => Some(r),
            Err(message) => {
                self.fail(format!("the backend panicked in {what}: {message}"));
                None
            }
        }
    }
}

/// Run `f`, catching a panic: its message.
pub fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // The backend's state is its own business: whatever it left half-done, unidev does
    // not read it again without a reset (the device is marked failed).
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(payload.as_ref()))
}

/// The text of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_fails_the_device_once_and_a_reset_clears_it() {
        let h = DeviceHealth::new("dev").unwrap();
        assert_eq!(h.call("get_config", || 7), Some(7));
        assert!(!h.is_failed());
        let r: Option<()> = h.call("set_config", || panic!("config is QEMU's"));
        assert!(r.is_none());
        assert!(h.is_failed());
        let why = h.failure().unwrap();
        assert!(
            why.contains("set_config") && why.contains("config is QEMU's"),
            "{why}"
        );
        // Readable once failed.
        assert_eq!(h.event.read().unwrap(), 1);
        // A failed device is not called; the first failure is kept.
        assert_eq!(h.call("handle_event", || 1), None);
        h.fail("later");
        assert!(h.failure().unwrap().contains("set_config"));
        h.clear();
        assert!(!h.is_failed() && h.failure().is_none());
        assert_eq!(h.call("handle_event", || 2), Some(2));
    }

    #[test]
    fn formatted_panic_messages_are_kept() {
        let n = 3;
        let e = contain(|| -> u8 { panic!("queue {n} is gone") }).unwrap_err();
        assert_eq!(e, "queue 3 is gone");
    }
}
