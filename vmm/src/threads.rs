//! Stopping a VM's threads without ever hanging the caller. Each thread
//! owns (through `Arc`s) everything it touches, guest memory included, so
//! a thread that does not stop in time can be left running: it keeps what
//! it uses alive, and the process can still exit.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a VM's threads get, all together, to stop.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Joins `thread` if it ends by `deadline`, calling `nudge` meanwhile
/// (every 200 us) to wake it; otherwise says so and leaves it. Returns
/// whether it was joined.
pub(crate) fn join_by(
    thread: JoinHandle<()>,
    deadline: Instant,
    mut nudge: impl FnMut(&JoinHandle<()>),
) -> bool {
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            log::error!(
                "thread {} did not stop in time; leaving it running",
                thread.thread().name().unwrap_or("?")
            );
            return false;
        }
        nudge(&thread);
        std::thread::sleep(Duration::from_micros(200));
    }
    let _ = thread.join();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_thread_that_will_not_stop_is_left_by_the_deadline() {
        let release = Arc::new(AtomicBool::new(false));
        let r = release.clone();
        let stuck = std::thread::Builder::new()
            .name("stuck".into())
            .spawn(move || {
                while !r.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap();
        let t = Instant::now();
        assert!(!join_by(
            stuck,
            Instant::now() + Duration::from_millis(100),
            |_| {}
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
        release.store(true, Ordering::Release);

        let mut nudged = 0;
        let quick = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(20)));
        assert!(join_by(
            quick,
            Instant::now() + Duration::from_secs(5),
            |_| nudged += 1
        ));
        assert!(nudged > 0);
    }
}
