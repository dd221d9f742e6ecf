//! The EVENT_IDX processing loop every virtio backend here shares (virtio 1.2 2.7.10):
//! suppress notifications, drain, re-enable, and go round again if the driver published
//! more meanwhile — with a guard against a driver whose available index is inconsistent.

use log::debug;
use vhost_user_backend::{VringRwLock, VringT};

/// Drain `vring` with `drain` (returns whether it took any buffer) until the driver has
/// nothing more, under EVENT_IDX. `device` names the device in log lines.
pub(crate) fn drain_with_event_idx(
    device: &str,
    vring: &VringRwLock,
    mut drain: impl FnMut() -> bool,
) {
    let mut idle_rounds = 0;
    loop {
        if let Err(e) = vring.disable_notification() {
            debug!("{device}: cannot disable notifications: {e}");
        }
        let progressed = drain();
        match vring.enable_notification() {
            Ok(true) if progressed => idle_rounds = 0,
            // New buffers were announced but none could be taken: once may be a race
            // with the driver, twice is a broken available ring.
            Ok(true) if idle_rounds == 0 => idle_rounds = 1,
            Ok(true) => {
                debug!("{device}: the available ring index is inconsistent");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                debug!("{device}: cannot enable notifications: {e}");
                break;
            }
        }
    }
}
