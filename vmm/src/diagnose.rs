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

    /// The scheduler state (proc(5): R, S, D, ...) of the thread
    /// registered as `name`.
    pub fn state(&self, name: &str) -> Option<char> {
        let tid = lock(&self.0).iter().find(|(n, _)| n == name)?.1;
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        stat.rsplit_once(") ")?.1.chars().next()
    }

    /// CPU time, in clock ticks, of the thread registered as `name`.
    pub fn cpu_ticks(&self, name: &str) -> Option<u64> {
        let tid = lock(&self.0).iter().find(|(n, _)| n == name)?.1;
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        let rest = stat.rsplit_once(") ")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(field(14)? + field(15)?)
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
fn lock_within<T: ?Sized>(m: &Mutex<T>, patience: Duration) -> Option<MutexGuard<'_, T>> {
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

/// How long a stall is watched for signs that the VMM is at fault.
const WATCH: Duration = Duration::from_millis(500);

/// Signs, watched for [`WATCH`], that a guest stopped answering because of
/// the VMM rather than by itself: a device that has not taken requests
/// the guest queued (a lost notification, a stuck device), a device whose
/// lock stays held, a device thread running flat out. Empty when there
/// are none: the guest (or the machine under it) stopped by itself.
pub(crate) fn vmm_at_fault(
    mem: &GuestMemory,
    transports: &[Arc<Mutex<MmioTransport>>],
    threads: &Threads,
) -> Vec<String> {
    let before = request_queues(mem, transports);
    let cpu_before = threads.cpu_ticks("devices");
    std::thread::sleep(WATCH);
    let after = request_queues(mem, transports);
    let cpu_after = threads.cpu_ticks("devices");
    // A device thread waiting on the host's disk (state D) holds up every
    // device behind it without being at fault: a slow host, not a stuck
    // VMM.
    if threads.state("devices") == Some('D') {
        return Vec::new();
    }
    let mut signs = Vec::new();
    for a in &before {
        let b = after
            .iter()
            .find(|b| b.device == a.device && b.queue == a.queue);
        let (i, q) = (a.device, a.queue);
        match (a.positions, b.and_then(|b| b.positions)) {
            (None, None) if b.is_some() => {
                signs.push(format!("virtio {i}: its lock was held throughout"))
            }
            (Some((_, seen_a)), Some((avail, seen))) if avail != seen && seen == seen_a => signs
                .push(format!(
                    "virtio {i} q{q}: the device took none of the guest's requests in {WATCH:?} \
                     (avail {avail}, seen {seen})"
                )),
            _ => {}
        }
    }
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        // Clock ticks are 10 ms: 45 of 50 is flat out.
        if b.saturating_sub(a) >= 45 && threads.state("devices") == Some('R') {
            signs.push(format!("the device thread ran flat out for {WATCH:?}"));
        }
    }
    signs.dedup();
    signs
}

/// Where one request queue stood.
struct QueueSample {
    device: usize,
    /// `usize::MAX` for a device whose lock could not be had.
    queue: usize,
    /// (avail, seen), or None for a device whose lock could not be had.
    positions: Option<(u16, u16)>,
}

/// Every ready queue that carries requests, as the device (whose copies
/// of the queues are the live ones) has them.
fn request_queues(mem: &GuestMemory, transports: &[Arc<Mutex<MmioTransport>>]) -> Vec<QueueSample> {
    let mut out = Vec::new();
    for (i, transport) in transports.iter().enumerate() {
        // A device holds its lock for one batch of requests at a time and
        // lets go between batches; a second is far more than a batch.
        let patience = Duration::from_secs(1);
        let busy = QueueSample {
            device: i,
            queue: usize::MAX,
            positions: None,
        };
        let Some(t) = lock_within(transport, patience) else {
            out.push(busy);
            continue;
        };
        let Some(device) = lock_within(t.device(), patience) else {
            out.push(busy);
            continue;
        };
        let Some(queues) = device.active_queues() else {
            continue;
        };
        for (q, queue) in queues.iter().enumerate() {
            let queue = devices::virtio::mmio::QueueSnapshot::of(queue);
            if !queue.ready || device.queue_waits_for_host(q) {
                continue;
            }
            let avail = mem
                .read_obj::<u16>(GuestAddress(queue.avail_ring.wrapping_add(2)))
                .unwrap_or(queue.next_avail);
            out.push(QueueSample {
                device: i,
                queue: q,
                positions: Some((avail, queue.next_avail)),
            });
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::mmio::{DRIVER_INIT_SEQUENCE, STATUS_ALL_OK};
    use devices::virtio::vsock::Vsock;
    use devices::virtio::RingMap;
    use devices::BusDevice;
    use vmm_sys_util::eventfd::EventFd;

    /// A started transport over `device` whose queues sit at 1 MiB,
    /// 256 KiB apart (desc, avail +64 KiB, used +128 KiB); nothing serves
    /// it, as with a device that lost its notifications.
    fn started(
        mem: &GuestMemory,
        device: impl devices::virtio::VirtioDevice + 'static,
    ) -> Arc<Mutex<MmioTransport>> {
        let mut t = MmioTransport::new(
            Arc::new(Mutex::new(device)),
            mem.clone(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            RingMap::new(),
        )
        .unwrap();
        let mut write = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
        write(0x70, DRIVER_INIT_SEQUENCE[0]);
        write(0x70, DRIVER_INIT_SEQUENCE[1]);
        write(0x24, 1);
        write(0x20, 1); // VIRTIO_F_VERSION_1
        write(0x70, DRIVER_INIT_SEQUENCE[2]);
        for q in 0..3u32 {
            let base = 0x10_0000 + u64::from(q) * 0x4_0000;
            write(0x30, q);
            write(0x38, 16);
            write(0x80, base as u32);
            write(0x90, (base + 0x1_0000) as u32);
            write(0xa0, (base + 0x2_0000) as u32);
            write(0x44, 1);
        }
        write(0x70, STATUS_ALL_OK);
        Arc::new(Mutex::new(t))
    }

    #[test]
    fn requests_the_device_never_takes_are_the_vmm_s_fault_and_waiting_buffers_are_not() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let vsock = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let transports = vec![started(&mem, vsock)];
        let threads = Threads::default();
        // The guest posted receive buffers (queue 0): they wait for the
        // host, nothing is wrong.
        mem.write_obj(4u16, GuestAddress(0x10_0000 + 0x1_0000 + 2))
            .unwrap();
        assert_eq!(
            vmm_at_fault(&mem, &transports, &threads),
            Vec::<String>::new()
        );
        // It queued packets for the device (queue 1) that nobody takes.
        mem.write_obj(2u16, GuestAddress(0x14_0000 + 0x1_0000 + 2))
            .unwrap();
        let signs = vmm_at_fault(&mem, &transports, &threads);
        assert_eq!(signs.len(), 1, "{signs:?}");
        assert!(
            signs[0].starts_with("virtio 0 q1: the device took none"),
            "{signs:?}"
        );
        // A device whose lock stays held.
        let held = transports[0].lock().unwrap();
        let signs = vmm_at_fault(&mem, &transports, &threads);
        drop(held);
        assert_eq!(
            signs,
            vec!["virtio 0: its lock was held throughout".to_string()]
        );
    }
}
