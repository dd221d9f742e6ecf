//! A SIGBUS guard for client memory that the client may truncate under the daemon.
//!
//! A device maps the files its clients share (vhost-user's memory table, vfio-user's
//! DMA_MAP with an fd). When a file cannot be sealed against shrinking (a tmpfs file from
//! `memory-backend-file`, a hugetlbfs file, a memfd made without `MFD_ALLOW_SEALING`), a
//! hostile client can truncate it while it is mapped; the next device access to the cut
//! range raises SIGBUS, whose default action kills the whole daemon and every device in
//! it. [`crate::memory`] registers such mappings here. On SIGBUS at an address inside a
//! registered mapping, the handler replaces the faulting page with a private zero page
//! (`mmap(MAP_FIXED | MAP_ANONYMOUS)`, one huge page for hugetlbfs) and returns, so the
//! access is retried and reads zeros — to the device the client's memory simply changed,
//! which it must tolerate anyway (guest memory changes under it at any time). Writes to
//! the replaced page never reach the client; its memory is gone already. Each absorbed
//! fault is counted and logged (outside the handler) at the next map change.
//!
//! Any other SIGBUS goes to the handler that was installed before (Rust's standard
//! library installs one for stack overflows) or, if there was none, to the default action.
//!
//! Registration is a fixed table of atomics the handler scans without locks or
//! allocation ([`SLOTS`] entries; mappings beyond that are served unguarded, with a
//! warning). A mapping's entry is cleared once the last snapshot holding its region has
//! dropped it (swept on the next map change), never while a worker may still touch it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};

use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

use crate::sync::lock;

/// How many unsealed mappings can be guarded at once. QEMU shares one file per RAM
/// block, so real clients use a handful.
pub const SLOTS: usize = 1024;

struct Slot {
    /// Set (non-zero) only while the entry is valid; written last, cleared first.
    end: AtomicUsize,
    start: AtomicUsize,
    /// Replacement granule: the page size of the mapping (huge page size on hugetlbfs).
    page: AtomicUsize,
    /// 0 free, 1 taken (claimed by `guard`, possibly not yet valid).
    taken: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE_SLOT: Slot = Slot {
    end: AtomicUsize::new(0),
    start: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    taken: AtomicUsize::new(0),
};

static TABLE: [Slot; SLOTS] = [FREE_SLOT; SLOTS];
static ABSORBED: AtomicU64 = AtomicU64::new(0);
static REPORTED: AtomicU64 = AtomicU64::new(0);
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();
/// Which slot guards which region, so an entry is cleared when its region is gone.
static OWNERS: Mutex<Vec<(usize, Weak<GuestRegionMmap>)>> = Mutex::new(Vec::new());

/// How many device accesses to truncated client memory the guard absorbed so far.
pub fn faults_absorbed() -> u64 {
    ABSORBED.load(Ordering::Relaxed)
}

/// Guard `region` (a mapping of a file that could not be sealed) with replacement
/// granule `page` (a power of two). Returns false, after a warning, when it cannot be
/// guarded (table full, or the handler cannot be installed).
pub fn guard(region: &Arc<GuestRegionMmap>, page: usize) -> bool {
    sweep();
    if !install_handler() {
        return false;
    }
    let start = region.as_ptr() as usize;
    let Some(end) = usize::try_from(region.len())
        .ok()
        .and_then(|len| start.checked_add(len))
    else {
        return false;
    };
    let Some(index) = TABLE.iter().position(|s| {
        s.taken
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }) else {
        log::warn!(
            "more than {SLOTS} unsealed client memory files are mapped: this one is not \
             guarded, and a client truncating it would crash the daemon (share memfds, \
             which are sealed, instead)"
        );
        return false;
    };
    let slot = &TABLE[index];
    slot.start.store(start, Ordering::Relaxed);
    slot.page.store(page.max(1), Ordering::Relaxed);
    slot.end.store(end, Ordering::Release);
    owners().push((index, Arc::downgrade(region)));
    true
}

/// Clear the entries whose region is gone (no snapshot holds it any more), and log the
/// faults absorbed since the last report.
pub fn sweep() {
    owners().retain(|(index, region)| {
        if region.strong_count() > 0 {
            return true;
        }
        let slot = &TABLE[*index];
        slot.end.store(0, Ordering::Release);
        slot.taken.store(0, Ordering::Release);
        false
    });
    let absorbed = ABSORBED.load(Ordering::Relaxed);
    let reported = REPORTED.swap(absorbed, Ordering::Relaxed);
    if absorbed > reported {
        log::warn!(
            "{} device access(es) hit client memory that the client truncated under its \
             mapping; they read zeros and their writes were dropped",
            absorbed - reported
        );
    }
}

fn owners() -> std::sync::MutexGuard<'static, Vec<(usize, Weak<GuestRegionMmap>)>> {
    lock(&OWNERS)
}

fn install_handler() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "SIG_DFL, no flags" value.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a zeroed sigaction, then every field this call relies on is set.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: sa_mask is a valid sigset_t owned by `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // Record the previous handler before ours can run, so chaining always sees it:
        // read it first (no change), store it, then install.
        // SAFETY: a null new action only reads the current one into `previous`.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) } != 0 {
            return;
        }
        let _ = PREVIOUS.set(previous);
        // SAFETY: `action` is fully initialised and `on_sigbus` is async-signal-safe (it
        // only reads atomics and makes the mmap/sigaction system calls).
        if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
            log::warn!(
                "cannot install the SIGBUS guard for client memory: {}",
                std::io::Error::last_os_error()
            );
        }
    });
    PREVIOUS.get().is_some()
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let address = unsafe { (*info).si_addr() } as usize;
    for slot in TABLE.iter() {
        let end = slot.end.load(Ordering::Acquire);
        if end == 0 {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        if address < start || address >= end {
            continue;
        }
        let page = slot.page.load(Ordering::Relaxed);
        let base = (address & !(page - 1)).max(start);
        let len = page.min(end - base);
        // SAFETY: replaces `len` bytes at `base`, which lie inside a mapping of client
        // memory that this process made and still holds (the entry is valid), with a
        // private zero page; nothing else lives in that range.
        let replaced = unsafe {
            libc::mmap(
                base as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            ABSORBED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        break;
    }
    chain(signal, info, context);
}

/// Hand a SIGBUS that is not ours to the previous handler, or restore the default
/// action so the retried access ends the process as it would have without the guard.
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: a zeroed sigaction is SIG_DFL; sigaction is async-signal-safe.
        let default: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the faulting access is retried on return and now kills.
        unsafe { libc::sigaction(signal, &default, std::ptr::null_mut()) };
        return;
    }
    let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    if siginfo {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this
        // signature; it gets the arguments the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(signal, info, context);
    } else {
        // SAFETY: a handler installed without SA_SIGINFO takes only the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(signal);
    }
}
