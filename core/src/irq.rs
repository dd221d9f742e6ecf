//! Interrupt lines backed by eventfds: the device side of VFIO's interrupt model.
//!
//! A PCI device has up to five interrupt *kinds* (VFIO's irq indices: INTx, MSI, MSI-X,
//! ERR, REQ), each with a number of lines (vectors). A client attaches an eventfd to a
//! line (vfio-user.rst "VFIO_USER_DEVICE_SET_IRQS", vhost-user's call fds, ...); the
//! device raises the line by writing the eventfd. Lines can be masked, which turns a
//! signal into a pending bit that fires on unmask.
//!
//! INTx is level-triggered and *automasked*, as in Linux's vfio-pci: when the device's
//! level is high and the line is unmasked, the eventfd is signalled once and the line
//! masks itself; the client unmasks it after the guest's EOI, and if the level is still
//! high the line fires again. The client may also hand over an "unmask eventfd"
//! (ACTION_UNMASK with an eventfd, the resampler of KVM's irqfd); the transport watches
//! it with [`Interrupts::unmask_fds`] and calls [`Interrupts::unmask`] when it fires.
//!
//! No wire format lives here: transports translate their messages into these calls.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::sync::lock;

/// The interrupt kinds of a PCI function, numbered as VFIO numbers its irq indices.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IrqKind {
    /// Legacy level-triggered INTx (one line).
    Intx = 0,
    /// MSI vectors.
    Msi = 1,
    /// MSI-X vectors.
    Msix = 2,
    /// Error reporting (one line).
    Err = 3,
    /// Device request, i.e. "please release the device" (one line).
    Req = 4,
}

impl IrqKind {
    /// All kinds, in index order.
    pub const ALL: [IrqKind; 5] = [
        IrqKind::Intx,
        IrqKind::Msi,
        IrqKind::Msix,
        IrqKind::Err,
        IrqKind::Req,
    ];

    /// The kind with VFIO irq index `index`.
    pub fn from_index(index: u32) -> Option<IrqKind> {
        Self::ALL.get(index as usize).copied()
    }

    /// VFIO irq index of this kind.
    pub fn index(self) -> u32 {
        self as u32
    }
}

/// How many lines of each kind a device has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqLayout {
    /// Lines per kind, by [`IrqKind::index`].
    pub counts: [u32; 5],
}

impl IrqLayout {
    /// A layout with the given number of INTx (0 or 1), MSI and MSI-X lines, plus one ERR
    /// and one REQ line (which every PCI function offers through VFIO).
    pub fn pci(intx: bool, msi: u32, msix: u32) -> Self {
        IrqLayout {
            counts: [u32::from(intx), msi, msix, 1, 1],
        }
    }

    /// Lines of `kind`.
    pub fn count(&self, kind: IrqKind) -> u32 {
        self.counts[kind as usize]
    }
}

/// Why an interrupt request was refused. Every variant means `EINVAL` on the wire.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IrqError {
    /// `start + count` runs past the number of lines of that kind.
    #[error("{kind:?} lines {start}..{start}+{count} are out of range (the device has {lines})")]
    OutOfRange {
        /// The kind.
        kind: IrqKind,
        /// First line asked for.
        start: u32,
        /// Number of lines asked for.
        count: u32,
        /// Lines the device has.
        lines: u32,
    },
    /// The number of eventfds or booleans does not match `count`.
    #[error("expected {expected} values, got {got}")]
    CountMismatch {
        /// Lines named.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// An unmask eventfd is only meaningful for INTx.
    #[error("an unmask eventfd is only supported for INTx")]
    UnmaskFdNotIntx,
}

impl IrqError {
    /// The errno for this error.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

#[derive(Default)]
struct Line {
    trigger: Option<EventFd>,
    unmask: Option<EventFd>,
    masked: bool,
    pending: bool,
}

struct State {
    lines: [Vec<Line>; 5],
    intx_level: bool,
    unmask_generation: u64,
}

/// The interrupt lines of one device, shared by the device (which raises them) and the
/// transport (which attaches eventfds and masks them on the client's behalf).
///
/// A device creates it with its [`IrqLayout`], hands it out through
/// `PciDevice::interrupts`, and raises lines with [`signal`](Interrupts::signal) (edge:
/// MSI, MSI-X, ERR, REQ) or [`set_intx_level`](Interrupts::set_intx_level) (INTx). It
/// never sees the client's eventfds itself. A device with an MSI-X capability routes its
/// table through [`crate::pci::Msix`], which calls `signal` on the vectors software
/// enabled.
///
/// # Example
///
/// ```
/// use unidev_core::irq::{Interrupts, IrqKind, IrqLayout};
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// let irqs = Interrupts::new(IrqLayout::pci(true, 0, 2)); // INTx and 2 MSI-X vectors
/// // The transport attaches the client's eventfd to MSI-X vector 1.
/// let vector1 = EventFd::new(EFD_NONBLOCK).unwrap();
/// irqs.set_eventfds(IrqKind::Msix, 1, vec![Some(vector1.try_clone().unwrap())])
///     .unwrap();
///
/// // The device raises the vector: the eventfd is written.
/// assert!(irqs.signal(IrqKind::Msix, 1));
/// assert_eq!(vector1.read().unwrap(), 1);
///
/// // While masked, a signal is held pending and delivered on unmask.
/// irqs.mask(IrqKind::Msix, 1, 1, None).unwrap();
/// assert!(!irqs.signal(IrqKind::Msix, 1));
/// assert!(irqs.pending(IrqKind::Msix, 1));
/// irqs.unmask(IrqKind::Msix, 1, 1, None).unwrap();
/// assert_eq!(vector1.read().unwrap(), 1);
///
/// // INTx is a level: raised until the device lowers it.
/// irqs.set_intx_level(true);
/// assert!(irqs.intx_level());
/// irqs.set_intx_level(false);
/// ```
pub struct Interrupts {
    layout: IrqLayout,
    state: Mutex<State>,
    listeners: Mutex<Vec<EventfdListener>>,
}

/// Called (outside any lock) after the trigger eventfds of a kind changed, so a device
/// can hand the new eventfds to whatever signals them directly (a vring's call fd).
pub type EventfdListener = std::sync::Arc<dyn Fn(IrqKind) + Send + Sync>;

impl std::fmt::Debug for Interrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupts")
            .field("layout", &self.layout)
            .finish()
    }
}

fn lines_for(n: u32) -> Vec<Line> {
    (0..n).map(|_| Line::default()).collect()
}

impl Interrupts {
    /// Lines for `layout`, all without eventfd and unmasked.
    pub fn new(layout: IrqLayout) -> Self {
        let c = layout.counts;
        Interrupts {
            layout,
            state: Mutex::new(State {
                lines: [
                    lines_for(c[0]),
                    lines_for(c[1]),
                    lines_for(c[2]),
                    lines_for(c[3]),
                    lines_for(c[4]),
                ],
                intx_level: false,
                unmask_generation: 0,
            }),
            listeners: Mutex::new(Vec::new()),
        }
    }

    /// Call `listener` whenever trigger eventfds are attached or detached.
    pub fn subscribe(&self, listener: EventfdListener) {
        lock(&self.listeners).push(listener);
    }

    fn eventfds_changed(&self, kind: IrqKind) {
        let listeners = lock(&self.listeners).clone();
        for l in listeners {
            l(kind);
        }
    }

    /// The device's layout.
    pub fn layout(&self) -> IrqLayout {
        self.layout
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a field store; a poisoned lock holds consistent data.
        lock(&self.state)
    }

    fn check(&self, kind: IrqKind, start: u32, count: u32) -> Result<(), IrqError> {
        let lines = self.layout.count(kind);
        match start.checked_add(count) {
            Some(end) if end <= lines => Ok(()),
            _ => Err(IrqError::OutOfRange {
                kind,
                start,
                count,
                lines,
            }),
        }
    }

    fn check_len<T>(values: &[T], count: u32) -> Result<(), IrqError> {
        if values.len() != count as usize {
            return Err(IrqError::CountMismatch {
                expected: count as usize,
                got: values.len(),
            });
        }
        Ok(())
    }

    /// Attach (Some) or detach (None) the trigger eventfds of lines `start..`.
    pub fn set_eventfds(
        &self,
        kind: IrqKind,
        start: u32,
        fds: Vec<Option<EventFd>>,
    ) -> Result<(), IrqError> {
        self.check(kind, start, fds.len() as u32)?;
        {
            let mut st = self.lock();
            for (i, fd) in fds.into_iter().enumerate() {
                st.lines[kind as usize][start as usize + i].trigger = fd;
            }
            // A level that is already high reaches a freshly attached INTx eventfd.
            if kind == IrqKind::Intx {
                Self::deliver_intx(&mut st);
            }
        }
        self.eventfds_changed(kind);
        Ok(())
    }

    /// Detach every eventfd of `kind` (VFIO: DATA_NONE|ACTION_TRIGGER with count 0),
    /// and clear masks and pending bits.
    pub fn disable(&self, kind: IrqKind) {
        {
            let mut st = self.lock();
            for line in st.lines[kind as usize].iter_mut() {
                *line = Line::default();
            }
            st.unmask_generation += 1;
        }
        self.eventfds_changed(kind);
    }

    /// Detach every eventfd of every kind (client gone) and reset masks.
    pub fn disable_all(&self) {
        for kind in IrqKind::ALL {
            self.disable(kind);
        }
    }

    /// Mask lines `start..start+count`, or only those whose flag is set when `which` is
    /// given.
    pub fn mask(
        &self,
        kind: IrqKind,
        start: u32,
        count: u32,
        which: Option<&[bool]>,
    ) -> Result<(), IrqError> {
        self.for_lines(kind, start, count, which, |_, line| line.masked = true)
    }

    /// Unmask lines; a pending signal fires now. For INTx a level still high fires again.
    pub fn unmask(
        &self,
        kind: IrqKind,
        start: u32,
        count: u32,
        which: Option<&[bool]>,
    ) -> Result<(), IrqError> {
        self.for_lines(kind, start, count, which, |_, line| {
            line.masked = false;
            // INTx re-fires from its level below, not from a latched bit.
            if line.pending && kind != IrqKind::Intx {
                Self::fire(line);
            }
        })?;
        if kind == IrqKind::Intx {
            Self::deliver_intx(&mut self.lock());
        }
        Ok(())
    }

    /// Signal lines on the client's behalf (VFIO loopback trigger).
    pub fn trigger(
        &self,
        kind: IrqKind,
        start: u32,
        count: u32,
        which: Option<&[bool]>,
    ) -> Result<(), IrqError> {
        self.for_lines(kind, start, count, which, |_, line| {
            Self::signal_line(line);
        })
    }

    /// Attach (Some) or detach (None) INTx's unmask eventfd.
    pub fn set_unmask_eventfd(
        &self,
        kind: IrqKind,
        start: u32,
        fds: Vec<Option<EventFd>>,
    ) -> Result<(), IrqError> {
        if kind != IrqKind::Intx {
            return Err(IrqError::UnmaskFdNotIntx);
        }
        self.check(kind, start, fds.len() as u32)?;
        let mut st = self.lock();
        for (i, fd) in fds.into_iter().enumerate() {
            st.lines[kind as usize][start as usize + i].unmask = fd;
        }
        st.unmask_generation += 1;
        Ok(())
    }

    /// Changes whenever the set of unmask eventfds changes, so a transport knows when to
    /// re-read [`unmask_fds`](Interrupts::unmask_fds).
    pub fn unmask_generation(&self) -> u64 {
        self.lock().unmask_generation
    }

    /// Duplicates of the attached unmask eventfds with their (kind, line), for a
    /// transport to poll.
    pub fn unmask_fds(&self) -> Vec<(EventFd, IrqKind, u32)> {
        let st = self.lock();
        let mut out = Vec::new();
        for kind in IrqKind::ALL {
            for (i, line) in st.lines[kind as usize].iter().enumerate() {
                if let Some(fd) = line.unmask.as_ref().and_then(|f| f.try_clone().ok()) {
                    out.push((fd, kind, i as u32));
                }
            }
        }
        out
    }

    /// Consume a fired unmask eventfd and unmask its line.
    pub fn handle_unmask_fd(&self, kind: IrqKind, line: u32) {
        {
            let st = self.lock();
            if let Some(fd) = st.lines[kind as usize]
                .get(line as usize)
                .and_then(|l| l.unmask.as_ref())
            {
                let _ = fd.read();
            }
        }
        let _ = self.unmask(kind, line, 1, None);
    }

    fn for_lines(
        &self,
        kind: IrqKind,
        start: u32,
        count: u32,
        which: Option<&[bool]>,
        mut f: impl FnMut(u32, &mut Line),
    ) -> Result<(), IrqError> {
        self.check(kind, start, count)?;
        if let Some(w) = which {
            Self::check_len(w, count)?;
        }
        let mut st = self.lock();
        for i in 0..count {
            if which.is_some_and(|w| !w[i as usize]) {
                continue;
            }
            f(
                start + i,
                &mut st.lines[kind as usize][(start + i) as usize],
            );
        }
        Ok(())
    }

    fn fire(line: &mut Line) -> bool {
        line.pending = false;
        match &line.trigger {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("cannot signal interrupt eventfd: {e}");
                }
                true
            }
            None => false,
        }
    }

    fn signal_line(line: &mut Line) -> bool {
        if line.masked {
            line.pending = true;
            false
        } else {
            Self::fire(line)
        }
    }

    fn deliver_intx(st: &mut State) {
        let level = st.intx_level;
        if let Some(line) = st.lines[IrqKind::Intx as usize].first_mut() {
            if level && !line.masked && line.trigger.is_some() {
                Self::fire(line);
                line.masked = true; // automask, as vfio-pci does
            }
            line.pending = level && line.masked;
        }
    }

    /// Device side: raise edge-style line `vector` of `kind` (MSI, MSI-X, ERR, REQ).
    /// Returns whether an eventfd was written (false when masked, now pending, or when
    /// no eventfd is attached).
    pub fn signal(&self, kind: IrqKind, vector: u32) -> bool {
        if kind == IrqKind::Intx {
            self.set_intx_level(true);
            return true;
        }
        let mut st = self.lock();
        match st.lines[kind as usize].get_mut(vector as usize) {
            Some(line) => Self::signal_line(line),
            None => false,
        }
    }

    /// Device side: set the INTx level. A rising level fires the line if unmasked.
    pub fn set_intx_level(&self, high: bool) {
        let mut st = self.lock();
        st.intx_level = high;
        Self::deliver_intx(&mut st);
    }

    /// The current INTx level.
    pub fn intx_level(&self) -> bool {
        self.lock().intx_level
    }

    /// Whether `kind`'s line `vector` has a signal waiting for unmask.
    pub fn pending(&self, kind: IrqKind, vector: u32) -> bool {
        self.lock().lines[kind as usize]
            .get(vector as usize)
            .is_some_and(|l| l.pending)
    }

    /// Whether `kind`'s line `vector` is masked.
    pub fn masked(&self, kind: IrqKind, vector: u32) -> bool {
        self.lock().lines[kind as usize]
            .get(vector as usize)
            .is_some_and(|l| l.masked)
    }

    /// Whether `kind`'s line `vector` has a trigger eventfd.
    pub fn has_eventfd(&self, kind: IrqKind, vector: u32) -> bool {
        self.lock().lines[kind as usize]
            .get(vector as usize)
            .is_some_and(|l| l.trigger.is_some())
    }

    /// A duplicate of the trigger eventfd of a line (e.g. to hand to a vring as its call
    /// fd so completions bypass this lock).
    pub fn eventfd(&self, kind: IrqKind, vector: u32) -> Option<EventFd> {
        self.lock().lines[kind as usize]
            .get(vector as usize)
            .and_then(|l| l.trigger.as_ref())
            .and_then(|fd| fd.try_clone().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn efd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn fired(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    #[test]
    fn intx_is_level_triggered_and_automasked() {
        let irqs = Interrupts::new(IrqLayout::pci(true, 0, 0));
        let fd = efd();
        irqs.set_eventfds(IrqKind::Intx, 0, vec![Some(fd.try_clone().unwrap())])
            .unwrap();
        irqs.set_intx_level(true);
        assert_eq!(fired(&fd), 1);
        assert!(irqs.masked(IrqKind::Intx, 0), "automasked after firing");
        irqs.set_intx_level(true);
        assert_eq!(fired(&fd), 0, "masked line does not fire again");
        irqs.unmask(IrqKind::Intx, 0, 1, None).unwrap();
        assert_eq!(fired(&fd), 1, "level still high: fires again on unmask");
        irqs.set_intx_level(false);
        irqs.unmask(IrqKind::Intx, 0, 1, None).unwrap();
        assert_eq!(fired(&fd), 0, "level low: unmask is quiet");
        assert!(!irqs.pending(IrqKind::Intx, 0));
    }

    #[test]
    fn masked_msix_vector_becomes_pending_and_fires_on_unmask() {
        let irqs = Interrupts::new(IrqLayout::pci(false, 0, 4));
        let fds: Vec<EventFd> = (0..4).map(|_| efd()).collect();
        irqs.set_eventfds(
            IrqKind::Msix,
            0,
            fds.iter().map(|f| Some(f.try_clone().unwrap())).collect(),
        )
        .unwrap();
        irqs.mask(IrqKind::Msix, 1, 2, Some(&[true, false]))
            .unwrap();
        assert!(!irqs.signal(IrqKind::Msix, 1));
        assert!(irqs.pending(IrqKind::Msix, 1));
        assert!(irqs.signal(IrqKind::Msix, 2));
        assert_eq!(fired(&fds[2]), 1);
        assert_eq!(fired(&fds[1]), 0);
        irqs.unmask(IrqKind::Msix, 0, 4, None).unwrap();
        assert_eq!(fired(&fds[1]), 1);
        assert!(!irqs.pending(IrqKind::Msix, 1));
    }

    #[test]
    fn ranges_and_counts_are_checked() {
        let irqs = Interrupts::new(IrqLayout::pci(true, 0, 2));
        assert!(irqs
            .set_eventfds(IrqKind::Msix, 1, vec![None, None])
            .is_err());
        assert!(irqs.mask(IrqKind::Msi, 0, 1, None).is_err());
        assert!(irqs.trigger(IrqKind::Msix, u32::MAX, 2, None).is_err());
        assert!(irqs.trigger(IrqKind::Msix, 0, 2, Some(&[true])).is_err());
        assert_eq!(
            irqs.set_unmask_eventfd(IrqKind::Msix, 0, vec![None]),
            Err(IrqError::UnmaskFdNotIntx)
        );
    }

    #[test]
    fn loopback_trigger_and_disable() {
        let irqs = Interrupts::new(IrqLayout::pci(false, 2, 0));
        let fd = efd();
        irqs.set_eventfds(IrqKind::Msi, 1, vec![Some(fd.try_clone().unwrap())])
            .unwrap();
        irqs.trigger(IrqKind::Msi, 0, 2, Some(&[false, true]))
            .unwrap();
        assert_eq!(fired(&fd), 1);
        irqs.disable(IrqKind::Msi);
        assert!(!irqs.has_eventfd(IrqKind::Msi, 1));
        assert!(!irqs.signal(IrqKind::Msi, 1));
    }

    #[test]
    fn unmask_eventfd_unmasks_intx() {
        let irqs = Interrupts::new(IrqLayout::pci(true, 0, 0));
        let trig = efd();
        let unmask = efd();
        irqs.set_eventfds(IrqKind::Intx, 0, vec![Some(trig.try_clone().unwrap())])
            .unwrap();
        irqs.set_unmask_eventfd(IrqKind::Intx, 0, vec![Some(unmask.try_clone().unwrap())])
            .unwrap();
        assert_eq!(irqs.unmask_fds().len(), 1);
        irqs.set_intx_level(true);
        assert_eq!(fired(&trig), 1);
        unmask.write(1).unwrap();
        irqs.handle_unmask_fd(IrqKind::Intx, 0);
        assert_eq!(fired(&trig), 1);
    }
}
