//! What a VM whose guest stopped answering is doing, told from the host:
//! which side is waiting. A virtqueue whose avail index is ahead of the
//! device's position holds requests the device never took (a lost
//! notification: ours); an interrupt left pending, or vCPU threads that
//! burn no CPU, point at the guest (or, in the nested test host, at the
//! machine under it).

use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use devices::virtio::mmio::MmioTransport;

use crate::cpu::vcpu::VcpuHandle;
use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// Whether a guest's console shows it failed for a reason of its own: a
/// kernel panic, an oops, a BUG, a protection fault, or a message from
/// its agent. A guest that died or stalled without any of these said
/// nothing about why.
pub fn console_shows_guest_failure(console: &str) -> bool {
    [
        "Kernel panic",
        "Oops",
        "BUG:",
        "general protection",
        "capsule-agent",
    ]
    .iter()
    .any(|sign| console.contains(sign))
}

/// The kernel thread ids of a VM's threads, for reading their state from
/// /proc. Each thread registers itself.
#[derive(Default)]
pub(crate) struct Threads(Mutex<Vec<(String, u32)>>);

impl Threads {
    pub fn register_current(&self, name: &str) {
        // /proc/thread-self names this thread as "<pid>/task/<tid>".
        let tid = std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse().ok());
        if let Some(tid) = tid {
            lock(&self.0).push((name.to_string(), tid));
        }
    }

    /// One line: each thread's state and CPU time in clock ticks, user +
    /// system, and of that how much ran the guest: a vCPU thread busy in
    /// the guest is a guest spinning, busy outside it is KVM looping.
    pub fn report(&self) -> String {
        let mut line = String::from("threads (cpu ticks, guest):");
        for (name, tid) in lock(&self.0).iter() {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"));
            let (state, cpu) = match stat {
                Ok(stat) => {
                    // After the parenthesised name (proc(5) field 2):
                    // state is field 3, utime 14, stime 15, guest_time 43.
                    let rest = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
                    let fields: Vec<&str> = rest.split_whitespace().collect();
                    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
                    let cpu = field(14)
                        .zip(field(15))
                        .map(|(u, s)| format!("{} {}", u + s, field(43).unwrap_or(0)));
                    (fields.first().copied().unwrap_or("?").to_string(), cpu)
                }
                Err(_) => ("gone".to_string(), None),
            };
            let cpu = cpu.unwrap_or_else(|| "?".to_string());
            line.push_str(&format!(" {name} {state} {cpu};"));
        }
        line
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The lock, if it comes free within `patience`: a vCPU holds a device's
/// lock only for one register access.
fn lock_within<T>(m: &Mutex<T>, patience: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + patience;
    loop {
        match m.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

/// One line per virtio device: its pending interrupt status, then per
/// queue the guest's avail index against how far the device has taken
/// (`seen`) and what it has returned (`used`).
pub(crate) fn queue_report(mem: &GuestMemory, transports: &[Arc<Mutex<MmioTransport>>]) -> String {
    let mut report = String::new();
    for (i, transport) in transports.iter().enumerate() {
        // A report on a stuck VM must not get stuck itself behind a device
        // that holds its lock.
        let Some(t) = lock_within(transport, Duration::from_millis(20)) else {
            report.push_str(&format!("virtio {i}: busy (its lock is held)\n"));
            continue;
        };
        let state = t.state();
        report.push_str(&format!(
            "virtio {i} (type {}): status {:#x}, interrupt {:#x}{};",
            t.device_type(),
            state.device_status,
            state.interrupt_status,
            if state.device_failed { ", failed" } else { "" }
        ));
        for (q, queue) in state.queues.iter().enumerate().filter(|(_, q)| q.ready) {
            // The avail ring's index follows its 16-bit flags.
            let avail = mem
                .read_obj::<u16>(GuestAddress(queue.avail_ring.wrapping_add(2)))
                .map_or("?".to_string(), |v| v.to_string());
            report.push_str(&format!(
                " q{q} avail {avail} seen {} used {};",
                queue.next_avail, queue.next_used
            ));
        }
        report.push('\n');
    }
    report
}

/// Where each vCPU is, sampled `samples` times 20 ms apart: instruction
/// pointer, privilege level and whether interrupts are enabled. The same
/// address every time with interrupts off is a guest stuck in a loop; a
/// `hlt` with them on is an idle guest waiting for an interrupt. A vCPU
/// that does not answer is not asked again.
pub(crate) fn vcpu_positions(vcpus: &[VcpuHandle], samples: usize) -> String {
    const RFLAGS_IF: u64 = 1 << 9;
    let mut report = String::new();
    for (i, vcpu) in vcpus.iter().enumerate() {
        report.push_str(&format!("vcpu{i} at"));
        for n in 0..samples {
            if n > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
            let state = match vcpu.pause() {
                Ok(()) => {
                    let state = vcpu.save_state();
                    let _ = vcpu.resume();
                    state
                }
                Err(e) => {
                    vcpu.resume_unanswered();
                    Err(e)
                }
            };
            match state {
                Ok(s) => report.push_str(&format!(
                    " {:#x} (cpl {}, interrupts {});",
                    s.regs.rip,
                    s.sregs.cs.selector & 3,
                    if s.regs.rflags & RFLAGS_IF != 0 {
                        "on"
                    } else {
                        "off"
                    }
                )),
                Err(e) => {
                    report.push_str(&format!(" ? ({e});"));
                    break;
                }
            }
        }
        report.push('\n');
    }
    report
}
