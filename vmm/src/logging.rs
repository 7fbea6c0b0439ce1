//! A plain stderr logger for programs built on this library (the capsule
//! CLI, the guest tests, the benchmarks), so that the VMM's warnings, such
//! as the report on a guest that stopped answering, reach someone.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

struct StderrLogger {
    prefix: &'static str,
    start: Instant,
}

/// Most bytes stderr may hold when it is a file (a supervised child's
/// log): past it the file starts over, so a guest cannot fill the disk
/// through the VMM's warnings, however long it runs.
pub const STDERR_FILE_MAX: u64 = 4 << 20;

/// Starts stderr over if it is a regular file past [`STDERR_FILE_MAX`].
fn cap_stderr_file() {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr();
    let fd = stderr.as_fd();
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return;
    };
    let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
    if regular && st.st_size as u64 > STDERR_FILE_MAX && nix::unistd::ftruncate(fd, 0).is_ok() {
        let _ = writeln!(
            std::io::stderr().lock(),
            "(this log passed {STDERR_FILE_MAX} bytes and was started over)"
        );
    }
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // The rust-vmm crates log what a guest's rings contain (a bad
        // address, say) without a limit of their own; ours use
        // devices::guest_log!.
        let ours = ["vmm", "devices", "snapshot", "guest_agent", "capsule"]
            .iter()
            .any(|c| record.target().split("::").next() == Some(c));
        if !ours {
            static FOREIGN: devices::ratelimit::LogLimiter = devices::ratelimit::LogLimiter::new();
            if FOREIGN.allow().is_none() {
                return;
            }
        }
        // Debugging wants to see when: seconds since the logger started.
        let when = if log::max_level() >= log::LevelFilter::Debug {
            format!("{:.3}s ", self.start.elapsed().as_secs_f64())
        } else {
            String::new()
        };
        // Straight to the descriptor, not through eprintln!, which a test
        // harness captures: a test that ends the process (a guest that
        // died in the nested test host) would lose the report.
        cap_stderr_file();
        let _ = writeln!(
            std::io::stderr().lock(),
            "{}[{when}{} {}] {}",
            self.prefix,
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

/// Logs to stderr, each line starting with `prefix`, at the level named by
/// the environment variable `level_var` (`info`, `debug` or `trace`;
/// warnings and errors otherwise). Does nothing if a logger is already set.
pub fn log_to_stderr(prefix: &'static str, level_var: &str) {
    static LOGGER: OnceLock<StderrLogger> = OnceLock::new();
    let logger = LOGGER.get_or_init(|| StderrLogger {
        prefix,
        start: Instant::now(),
    });
    if log::set_logger(logger).is_ok() {
        let level = match std::env::var(level_var).as_deref() {
            Ok("info") => log::LevelFilter::Info,
            Ok("debug") => log::LevelFilter::Debug,
            Ok("trace") => log::LevelFilter::Trace,
            _ => log::LevelFilter::Warn,
        };
        log::set_max_level(level);
    }
}
