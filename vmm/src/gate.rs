//! Parks the device event loop between two rounds, so that a snapshot
//! sees devices with no request half-served and nothing writing guest
//! memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct GateState {
    requested: bool,
    parked: bool,
}

#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the loop to park; the caller then wakes the loop and waits
    /// with [`PauseGate::wait_parked`].
    pub fn request(&self) {
        self.lock().requested = true;
    }

    /// Waits until the loop is parked; false on timeout.
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !state.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Lets the loop run again.
    pub fn release(&self) {
        self.lock().requested = false;
        self.changed.notify_all();
    }

    /// Called by the loop between rounds: parks while a pause is
    /// requested and the VM is not stopping.
    pub fn park_if_requested(&self, stop: &AtomicBool) {
        let mut state = self.lock();
        if !state.requested {
            return;
        }
        state.parked = true;
        self.changed.notify_all();
        while state.requested && !stop.load(Ordering::Acquire) {
            state = self
                .changed
                .wait_timeout(state, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.parked = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_loop_parks_until_released() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (g, s, r) = (gate.clone(), stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                g.park_if_requested(&s);
                r.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        gate.request();
        assert!(gate.wait_parked(Duration::from_secs(5)));
        let parked_at = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), parked_at, "ran while parked");
        gate.release();
        std::thread::sleep(Duration::from_millis(30));
        assert!(rounds.load(Ordering::SeqCst) > parked_at, "did not resume");
        // A stop reaches a parked loop too.
        gate.request();
        assert!(gate.wait_parked(Duration::from_secs(5)));
        stop.store(true, Ordering::Release);
        thread.join().unwrap();
    }
}
