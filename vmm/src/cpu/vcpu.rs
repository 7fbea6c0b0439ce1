//! The vCPU thread: run the vCPU, dispatch port and MMIO exits to the
//! buses, and turn the ways a guest can stop into a [`VmExit`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::state::{self, VcpuState};
use crate::error::{Error, Result};
use crate::exit::{ExitState, VmExit};
use crate::host::KvmFlavor;

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    pub stop: Arc<AtomicBool>,
    pub flavor: KvmFlavor,
    /// MSRs a snapshot saves (see [`state::msrs_to_save`]).
    pub msrs_to_save: Vec<u32>,
    /// Where each vCPU thread registers for [`crate::Vm::stall_report`].
    pub(crate) threads: Arc<crate::diagnose::Threads>,
}

/// What the VMM asks of a vCPU thread. The thread owns its `VcpuFd`, so
/// everything that needs the vCPU stopped goes through it.
enum Request {
    Pause,
    SaveState,
    Resume,
}

enum Reply {
    Paused,
    State(Box<Result<VcpuState>>),
    Resumed,
}

/// Each request carries a number its reply repeats, so an answer that
/// arrives after its caller gave up is never taken for a later one's.
type Seq = u64;

/// A running vCPU thread and the line to it.
pub struct VcpuHandle {
    thread: JoinHandle<()>,
    requests: Sender<(Seq, Request)>,
    replies: Receiver<(Seq, Reply)>,
    next_seq: AtomicU64,
    index: u8,
}

/// How long a vCPU may take to answer: pausing waits for KVM_RUN to
/// return, which a kick forces within microseconds.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuHandle {
    /// Stops the vCPU between two guest instructions, with any port or
    /// MMIO access it was in the middle of completed, so its registers
    /// are a consistent state to save.
    pub fn pause(&self) -> Result<()> {
        match self.ask(Request::Pause)? {
            Reply::Paused => Ok(()),
            _ => Err(self.confused()),
        }
    }

    /// The state of a paused vCPU.
    pub fn save_state(&self) -> Result<VcpuState> {
        match self.ask(Request::SaveState)? {
            Reply::State(state) => *state,
            _ => Err(self.confused()),
        }
    }

    pub fn resume(&self) -> Result<()> {
        match self.ask(Request::Resume)? {
            Reply::Resumed => Ok(()),
            _ => Err(self.confused()),
        }
    }

    /// Queues a resume without waiting for its answer: for a vCPU whose
    /// pause was not answered, which must still run again once it takes
    /// that pause. Its late replies are dropped by the next request.
    pub fn resume_unanswered(&self) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let _ = self.requests.send((seq, Request::Resume));
    }

    /// Sends `request` and waits for its own reply, dropping late replies
    /// to earlier requests.
    fn ask(&self, request: Request) -> Result<Reply> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        // Only a running vCPU needs knocking out of KVM_RUN, and the kick
        // can land just before the thread enters it: repeat it until the
        // thread answers.
        let kicking = matches!(request, Request::Pause);
        self.requests
            .send((seq, request))
            .map_err(|_| self.gone())?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let wait = if kicking {
                kick(&self.thread);
                Duration::from_millis(1)
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            match self.replies.recv_timeout(wait) {
                Ok((answered, reply)) if answered == seq => return Ok(reply),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::NotRunning(format!(
                        "vCPU {} did not answer within {}s",
                        self.index,
                        ANSWER_TIMEOUT.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.gone()),
            }
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Knocks the thread out of KVM_RUN so it sees the stop flag.
    pub fn kick(&self) {
        kick(&self.thread);
    }

    /// Stops the thread (it must have been told to through the stop
    /// flag): kicks it out of KVM_RUN until it ends, or `deadline`
    /// passes and it is left running. Returns whether it ended.
    pub fn join_by(self, deadline: std::time::Instant) -> bool {
        crate::threads::join_by(self.thread, deadline, kick)
    }

    fn gone(&self) -> Error {
        Error::NotRunning(format!("vCPU {} has stopped", self.index))
    }

    fn confused(&self) -> Error {
        Error::NotRunning(format!("vCPU {} answered out of turn", self.index))
    }
}

/// The signal used to knock a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Starts a thread running `vcpu`. With `paused`, the thread starts parked
/// (a restored vCPU waits for the whole VM to be restored) and runs the
/// guest only after [`VcpuHandle::resume`].
pub fn spawn(
    mut vcpu: VcpuFd,
    index: u8,
    ctx: Arc<VcpuContext>,
    paused: bool,
) -> std::io::Result<VcpuHandle> {
    install_kick_handler();
    let (request_tx, requests) = channel();
    let (replies, reply_rx) = channel();
    if paused {
        let _ = request_tx.send((0, Request::Pause));
    }
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            ctx.threads.register_current(&format!("vcpu{index}"));
            run(&mut vcpu, index, &ctx, &requests, &replies)
        })?;
    if paused {
        // Swallow the thread's answer to the pause queued above.
        match reply_rx.recv_timeout(ANSWER_TIMEOUT) {
            Ok((0, Reply::Paused)) => {}
            _ => log::warn!("vCPU {index} did not start paused"),
        }
    }
    Ok(VcpuHandle {
        thread,
        requests: request_tx,
        replies: reply_rx,
        next_seq: AtomicU64::new(1),
        index,
    })
}

fn kick(handle: &JoinHandle<()>) {
    let _ = handle.kill(kick_signal());
}

/// Parks a vCPU thread that was asked to pause and serves requests until
/// it is resumed. Returns false if the VM is stopping instead.
/// `seq` numbers the pause request that parked it.
fn paused(
    vcpu: &mut VcpuFd,
    ctx: &VcpuContext,
    seq: Seq,
    requests: &Receiver<(Seq, Request)>,
    replies: &Sender<(Seq, Reply)>,
) -> bool {
    // An exit to userspace for port or MMIO I/O is only finished (the
    // value read written to the guest's register) on the next KVM_RUN.
    // With immediate_exit set, KVM_RUN does just that and returns EINTR
    // without entering the guest.
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    if replies.send((seq, Reply::Paused)).is_err() {
        return false;
    }
    loop {
        match requests.recv_timeout(Duration::from_millis(50)) {
            Ok((seq, Request::SaveState)) => {
                let saved = state::save(vcpu, &ctx.msrs_to_save);
                if replies.send((seq, Reply::State(Box::new(saved)))).is_err() {
                    return false;
                }
            }
            Ok((seq, Request::Pause)) => {
                let _ = replies.send((seq, Reply::Paused));
            }
            Ok((seq, Request::Resume)) => {
                // Tell the guest it was stopped, so its watchdogs do not
                // count the pause as a lockup (fails harmlessly on a
                // guest without kvmclock).
                let _ = vcpu.kvmclock_ctrl();
                return replies.send((seq, Reply::Resumed)).is_ok();
            }
            Err(RecvTimeoutError::Timeout) if !ctx.stop.load(Ordering::Acquire) => {}
            Err(_) => return false,
        }
    }
}

fn run(
    vcpu: &mut VcpuFd,
    index: u8,
    ctx: &VcpuContext,
    requests: &Receiver<(Seq, Request)>,
    replies: &Sender<(Seq, Reply)>,
) {
    while !ctx.stop.load(Ordering::Acquire) {
        if let Ok((seq, request)) = requests.try_recv() {
            match request {
                Request::Pause => {
                    if !paused(vcpu, ctx, seq, requests, replies) {
                        return;
                    }
                    continue;
                }
                // Only a paused vCPU can be saved or resumed.
                Request::SaveState => {
                    let error = Error::NotRunning(format!("vCPU {index} was not paused"));
                    let _ = replies.send((seq, Reply::State(Box::new(Err(error)))));
                }
                Request::Resume => {
                    let _ = replies.send((seq, Reply::Resumed));
                }
            }
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                ctx.exit
                    .set(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}")));
                return;
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                ctx.pio.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                ctx.mmio.write(addr, data);
            }
            VcpuExit::Hlt => {}
            VcpuExit::Shutdown => {
                // A triple fault: how a guest without i8042 resets, or how
                // a crashing one ends. The registers can tell which on
                // Intel; on AMD, KVM has already reset them (rip 0xfff0).
                log::debug!("vCPU {index}: triple fault; {}", registers(vcpu));
                ctx.exit.set(VmExit::GuestReset);
                return;
            }
            VcpuExit::SystemEvent(kind, _) => {
                ctx.exit.set(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestPowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::GuestReset,
                    other => VmExit::Error(format!("vCPU {index}: system event {other}")),
                });
                return;
            }
            VcpuExit::InternalError => {
                let message = format!("vCPU {index}: KVM internal error (emulation failure)");
                ctx.exit.set(if ctx.flavor == KvmFlavor::Pvm {
                    VmExit::Unsupported(message)
                } else {
                    VmExit::Error(message)
                });
                return;
            }
            VcpuExit::FailEntry(reason, cpu) => {
                ctx.exit.set(VmExit::Error(format!(
                    "vCPU {index}: VM entry failed (reason {reason:#x}, cpu {cpu})"
                )));
                return;
            }
            VcpuExit::Intr => {}
            other => {
                ctx.exit.set(VmExit::Error(format!(
                    "vCPU {index}: unexpected exit {other:?}"
                )));
                return;
            }
        }
    }
}

/// Where a vCPU stopped, for diagnostics.
fn registers(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    }
}
