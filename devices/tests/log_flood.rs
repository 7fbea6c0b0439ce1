//! A guest that makes a device complain as fast as it can gets a few
//! lines in the host's log, not millions: every guest-triggerable warning
//! is rate-limited per call site. Counted with a logger of the test's own
//! (this file is its own process: the logger is global).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use devices::ratelimit::BURST;
use devices::virtio::block::Block;
use devices::virtio::vsock::Vsock;

static LINES: AtomicUsize = AtomicUsize::new(0);

struct Counter;

impl log::Log for Counter {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            LINES.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn flush(&self) {}
}

fn count_lines(f: impl FnOnce()) -> usize {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Counter).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    });
    let before = LINES.load(Ordering::SeqCst);
    f();
    LINES.load(Ordering::SeqCst) - before
}

/// Does `mistake` 1000 times and checks it was logged, but within one
/// call site's budget.
fn assert_few_lines(what: &str, mut mistake: impl FnMut()) {
    let lines = count_lines(|| {
        for _ in 0..1000 {
            mistake();
        }
    });
    assert!(
        lines >= 1,
        "1000 {what} logged nothing: the mistake was not made"
    );
    assert!(lines <= BURST as usize + 1, "{lines} lines for 1000 {what}");
}

#[test]
fn floods_of_guest_mistakes_log_a_bounded_number_of_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let mut blk = Driver::new(Block::open(&path, false).unwrap(), 16);
    let mut vsock = blk.sibling(
        Vsock::new(3, &dir.path().join("v.sock")).unwrap(),
        16,
        RINGS_BASE + 0x80_0000,
    );

    // Requests with no room for a status byte.
    assert_few_lines("bad requests", || {
        blk.write_chain(0, 0, &[(0x40_0000, 16, false)]);
        blk.submit(0, 0);
    });
    // Queue registers written while the device runs.
    assert_few_lines("register writes", || blk.write_reg(0x38, 8));
    // Malformed vsock packets (a header cut short).
    assert_few_lines("bad packets", || {
        vsock.write(0xa0_0000, &[0u8; 10]);
        vsock.write_chain(1, 0, &[(0xa0_0000, 10, false)]);
        vsock.submit(1, 0);
    });
}
