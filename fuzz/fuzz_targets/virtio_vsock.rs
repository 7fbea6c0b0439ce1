//! virtio-vsock taking packets from a hostile driver: the TX queue's
//! descriptors and packets, and the RX and event queues' buffers, come
//! from the fuzzer (compactly laid out, or raw bytes over the rings).
#![no_main]

use capsule_fuzz::{lay_out_queue, Harness, BUFFERS, QUEUE_SPAN, RINGS};
use devices::virtio::vsock::Vsock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("capsule-fuzz-vsock-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let Ok(vsock) = Vsock::new(3, &dir.join("v.sock")) else {
        return;
    };
    let mut h = Harness::start(vsock, 16);
    if flags & 1 == 0 {
        let rest = lay_out_queue(&h, 1, rest);
        let rest = lay_out_queue(&h, 0, rest);
        h.load(BUFFERS, rest);
    } else {
        let third = rest.len() / 3;
        let (tx, more) = rest.split_at(third);
        let (rx, buffers) = more.split_at(third);
        h.load(RINGS + QUEUE_SPAN, tx);
        h.load(RINGS, rx);
        h.load(BUFFERS, buffers);
    }
    h.kick(1);
    h.kick(0);
    h.kick(2);
    h.run(64);
});
