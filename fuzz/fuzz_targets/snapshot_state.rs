//! A snapshot's state file, as restore reads it: the container and every
//! section, with all of the checks a restore makes before it builds a VM.
//! Half the inputs are taken as sections and written into a container
//! with valid checksums, as an attacker recomputes them, so the fuzzer
//! reaches the section decoders and the consistency checks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapshot::container::StateWriter;

const TAGS: [&[u8; 4]; 6] = [b"INFO", b"VMST", b"VCPU", b"DEVS", b"DIRT", b"WSET"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        // [tag index u8][len u16][payload]...
        let mut w = StateWriter::new();
        let mut at = rest;
        while at.len() >= 3 {
            let tag = *TAGS[usize::from(at[0]) % TAGS.len()];
            let len = usize::from(u16::from_le_bytes([at[1], at[2]])).min(at.len() - 3);
            w.section(tag, at[3..3 + len].to_vec());
            at = &at[3 + len..];
        }
        w.to_bytes()
    };
    let _ = snapshot::container::parse(&bytes);
    if let Ok(snap) = vmm::persist::Snapshot::from_bytes(std::path::Path::new("fuzz"), &bytes) {
        let _ = snap.to_bytes();
        // Each device decodes and checks its own state at restore.
        use devices::virtio::block::BlockState;
        use devices::virtio::persist::decode;
        use devices::virtio::vsock::VsockState;
        for saved in &snap.devices.virtio {
            let _ = decode::<BlockState>("disk", &saved.device.state);
            let _ = decode::<VsockState>("vsock", &saved.device.state);
        }
    }
});
