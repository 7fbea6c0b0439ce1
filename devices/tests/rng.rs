//! virtio-rng against real guest memory.

mod common;

use common::*;
use devices::virtio::rng::Rng;

const BUF: u64 = 0x80_0000;

#[test]
fn fills_buffers_and_survives_hostile_ones() {
    let mut d = Driver::new(Rng::new().unwrap(), 16);
    d.write_chain(0, 0, &[(BUF, 64, true), (BUF + 4096, 64, true)]);
    d.submit(0, 0);
    assert_eq!(d.used_entry(0, 0), (0, 128));
    let a = d.read(BUF, 64);
    let b = d.read(BUF + 4096, 64);
    assert!(
        a.iter().any(|&x| x != 0) && a != b,
        "random bytes delivered"
    );

    // Zero-length, read-only, outside memory and 4 GiB buffers.
    for (addr, len, writable) in [
        (BUF, 0, true),
        (BUF, 64, false),
        (MEM_SIZE as u64, 64, true),
        (BUF, u32::MAX, true),
    ] {
        d.write_chain(0, 0, &[(addr, len, writable)]);
        let before = d.used_idx(0);
        d.submit(0, 0);
        assert_eq!(d.used_idx(0), before.wrapping_add(1));
        assert_eq!(d.used_entry(0, before).1, 0);
    }
    // Large requests are capped, not allocated whole.
    d.write_chain(0, 0, &[(BUF, 8 << 20, true)]);
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_entry(0, before).1, 64 * 1024);
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
}
