//! What a `capsule-vmm` child costs beyond its guest's memory: CPU time
//! from exec to a ready control socket, and private memory that is not
//! guest RAM once a VM is built. Prints a table; run with
//! `cargo bench -p capsule-vmm --bench overhead` (CAPSULE_KERNEL names a
//! guest kernel for the memory row).
//!
//! The VM is built but not run, so this measures the same thing on any
//! KVM, PVM included; figures are in the README with where they were
//! measured.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsule_vmm::client::{self, ChildClient};
use capsule_vmm::protocol::{BootSpec, Op};
use nix::sys::resource::{getrusage, UsageWho};

const RUNS: usize = 20;
const GUEST_MIB: u64 = 256;

fn exe() -> PathBuf {
    std::env::var_os("CAPSULE_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_capsule-vmm")))
}

fn private_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    vmm::private::ensure_private_dir(&dir).unwrap();
    dir
}

fn children_cpu() -> Duration {
    let r = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap();
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(r.user_time()) + t(r.system_time())
}

fn start(dir: &Path) -> (std::process::Child, ChildClient) {
    let (cmd, channel) = client::command(&exe(), dir).unwrap();
    client::spawn(cmd, channel).unwrap()
}

/// Private memory of `pid` outside mappings of exactly `guest` bytes
/// (guest RAM), in KiB, and the process's whole RSS.
fn private_beyond_guest(pid: u32, guest: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut private, mut rss, mut in_guest) = (0, 0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                in_guest = e - s == guest;
                continue;
            }
        }
        let mut kib = || {
            words
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => rss += kib(),
            "Private_Clean:" | "Private_Dirty:" if !in_guest => private += kib(),
            _ => {}
        }
    }
    (private, rss)
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for i in 0..RUNS {
        let dir = private_dir(tmp.path(), &format!("start{i}"));
        let before = children_cpu();
        let t = Instant::now();
        let (mut process, client) = start(&dir);
        wall.push(t.elapsed());
        // With no VM and no connection the child exits at once: what it
        // used is its start-up and its exit.
        drop(client);
        process.wait().unwrap();
        cpu.push(children_cpu() - before);
    }
    wall.sort();
    cpu.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("capsule-vmm start-up, {RUNS} runs (median, max):");
    println!(
        "  exec to hello        {:7.2} ms {:7.2} ms",
        ms(wall[RUNS / 2]),
        ms(wall[RUNS - 1])
    );
    println!(
        "  CPU time (user+sys)  {:7.2} ms {:7.2} ms   (start-up and exit)",
        ms(cpu[RUNS / 2]),
        ms(cpu[RUNS - 1])
    );

    let Some(kernel) = std::env::var_os("CAPSULE_KERNEL") else {
        println!("memory: set CAPSULE_KERNEL to a guest kernel to measure it");
        std::process::exit(1);
    };
    let dir = private_dir(tmp.path(), "vm");
    let (mut process, mut client) = start(&dir);
    let kernel = File::open(kernel).unwrap();
    let spec = BootSpec {
        cpus: 1,
        memory_mib: GUEST_MIB,
        initramfs: false,
        disks: Vec::new(),
        cmdline: Vec::new(),
        verbose_console: false,
    };
    client
        .call(Op::Boot(spec), &[kernel.as_fd()], Duration::from_secs(30))
        .unwrap();
    let (private, rss) = private_beyond_guest(process.id(), GUEST_MIB << 20);
    println!("capsule-vmm with a {GUEST_MIB} MiB VM built (paused):");
    println!("  private memory that is not guest RAM  {private} KiB  (RSS {rss} KiB in all)");
    let _ = client.call(Op::Kill, &[], Duration::from_secs(10));
    let _ = process.wait();
}
