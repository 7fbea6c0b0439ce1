//! virtio-blk serving whatever rings and requests a hostile driver lays
//! out in guest memory: descriptors, avail ring and buffers all come from
//! the fuzzer (compactly laid out, or raw bytes over the rings). No
//! panic, no spinning, nothing written outside guest memory.
#![no_main]

use std::sync::OnceLock;

use capsule_fuzz::{lay_out_queue, Harness, BUFFERS, RINGS};
use devices::virtio::block::Block;
use libfuzzer_sys::fuzz_target;

fn disk() -> &'static std::path::Path {
    static DISK: OnceLock<std::path::PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("capsule-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![0xa5u8; 256 * 1024]).unwrap();
        path
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(block) = Block::open(disk(), flags & 1 == 1) else {
        return;
    };
    let mut h = Harness::start(block, 16);
    if flags & 2 == 0 {
        let buffers = lay_out_queue(&h, 0, rest);
        h.load(BUFFERS, buffers);
    } else {
        let (rings, buffers) = rest.split_at(rest.len().min(0x1100));
        h.load(RINGS, rings);
        h.load(BUFFERS, buffers);
    }
    h.kick(0);
    h.run(64);
    // A driver that resets and starts again finds a working device.
    if flags & 4 != 0 {
        use devices::BusDevice;
        h.transport.write(0x70, &0u32.to_le_bytes());
        h.run(4);
    }
});
