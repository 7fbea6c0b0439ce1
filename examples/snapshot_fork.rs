//! Prime a guest, snapshot it, and fork it into replicas that each take on
//! their own identity.
//!
//!     cargo run --release --example snapshot_fork -- VMLINUX INITRAMFS [FORKS]

use std::time::{Duration, Instant};

use sandbox::VmSettings;

use sandbox::{fork_identity, MemoryBackend, RestoreOptions, Sandbox};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (kernel, initramfs) = (
        args.next().ok_or("kernel?")?,
        args.next().ok_or("initramfs?")?,
    );
    let forks: usize = args.next().map_or(Ok(3), |n| n.parse())?;
    let dir = tempfile_dir()?;

    // Boot and prime: whatever the guest computes now, every fork has.
    let mut vm = Sandbox::builder()
        .kernel(kernel)
        .initramfs(initramfs)
        .memory_mib(256)
        .boot()?;
    vm.wait_ready(Duration::from_secs(30))?;
    vm.exec(["sh", "-c", "seq 1 100000 > /tmp/primed"])?;

    // Pause, snapshot, and let the original go.
    vm.pause()?;
    let stats = vm.snapshot(&dir)?;
    vm.kill();
    eprintln!(
        "snapshot: {} MiB of memory written, guest paused {:?}",
        stats.memory_bytes_written >> 20,
        stats.paused_for
    );

    // Fork: each replica maps the same memory file (shared page cache) and
    // gets a fresh hostname, machine id, clock and RNG seed.
    let started = Instant::now();
    let mut replicas = Vec::new();
    for i in 0..forks {
        let options = RestoreOptions {
            // The default backend: replicas share the memory file's pages.
            vm: vmm::RestoreOptions {
                memory: MemoryBackend::File,
                ..Default::default()
            },
            identity: fork_identity(format!("replica-{i}"))?,
            ..Default::default()
        };
        replicas.push(Sandbox::restore(&dir, options)?);
    }
    eprintln!("{forks} replicas restored in {:?}", started.elapsed());
    for vm in &mut replicas {
        let out = vm.exec([
            "sh",
            "-c",
            "echo $(hostname) $(wc -l < /tmp/primed) $(head -c 4 /dev/urandom | od -An -tx1)",
        ])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    for mut vm in replicas {
        vm.shutdown(Duration::from_secs(10))?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("capsule-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
