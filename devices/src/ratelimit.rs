//! Log lines a guest can cause, rate-limited: a hostile guest must not be
//! able to fill the host's disk or memory (logs often live on tmpfs) by
//! making the same complaint a million times a second.
//!
//! Each call site of [`guest_log!`] has its own budget: up to
//! [`BURST`] lines per [`WINDOW`], then silence, then one line saying how
//! many were left out.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log per window.
pub const BURST: u32 = 10;
/// The window a call site's budget renews over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget.
pub struct LogLimiter {
    state: Mutex<LimiterState>,
}

struct LimiterState {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new() -> Self {
        LogLimiter {
            state: Mutex::new(LimiterState {
                window_start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be logged now; if so, how many were suppressed
    /// since the last one that was.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let renew = s
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if renew {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged >= BURST {
            s.suppressed += 1;
            return None;
        }
        s.logged += 1;
        Some(std::mem::take(&mut s.suppressed))
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs like `log::log!`, within the call site's budget (see the module).
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMITER: $crate::ratelimit::LogLimiter = $crate::ratelimit::LogLimiter::new();
        if log::log_enabled!($level) {
            match LIMITER.allow() {
                Some(0) => log::log!($level, $($arg)+),
                Some(n) => log::log!(
                    $level,
                    "{} ({n} more like it suppressed)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

/// [`guest_log!`] at warning level.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::guest_log!(log::Level::Warn, $($arg)+) };
}

/// [`guest_log!`] at error level.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::guest_log!(log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count() {
        let limiter = LogLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limiter.allow_at(t0), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(limiter.allow_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(limiter.allow_at(t0 + WINDOW), Some(1000));
        assert_eq!(limiter.allow_at(t0 + WINDOW), Some(0));
    }
}
