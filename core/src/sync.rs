//! Locks that survive a panic elsewhere.
//!
//! A panic while a `std::sync::Mutex` is held poisons it. unidev's rule is that a panic
//! in a backend costs that device only (`../shared/ARCHITECTURE.md`), so code that shares
//! state across threads — sessions, interrupt routes, the memory layer's bookkeeping —
//! must keep working with the data as the panicking thread left it: every structure
//! behind these locks is kept consistent at each unlock point, never half-updated across
//! a call that could panic. [`lock`] is the one place that decision is made.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock `mutex`, taking the guard of a poisoned lock as if it were not poisoned (see the
/// module documentation for why that is sound here).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Read-lock `lock`, taking a poisoned lock as if it were not (see [`lock`]).
pub fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Write-lock `lock`, taking a poisoned lock as if it were not (see [`lock`]).
pub fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_lock_poisoned_by_a_panicking_thread_is_still_usable() {
        let shared = Arc::new(Mutex::new(1));
        let s = shared.clone();
        let panicked = std::thread::spawn(move || {
            let mut g = s.lock().unwrap();
            *g = 2;
            panic!("backend bug");
        })
        .join();
        assert!(panicked.is_err());
        assert!(shared.is_poisoned());
        *lock(&shared) += 1;
        assert_eq!(*lock(&shared), 3);
    }
}
