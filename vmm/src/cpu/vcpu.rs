//! The vCPU thread: run the vCPU, dispatch port and MMIO exits to the
//! buses, and turn the ways a guest can stop into a [`VmExit`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitState, VmExit};
use crate::host::KvmFlavor;

/// What every vCPU thread shares.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitState>,
    pub stop: Arc<AtomicBool>,
    pub flavor: KvmFlavor,
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

pub fn spawn(
    mut vcpu: VcpuFd,
    index: u8,
    ctx: Arc<VcpuContext>,
) -> std::io::Result<JoinHandle<()>> {
    install_kick_handler();
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || run(&mut vcpu, index, &ctx))
}

/// Interrupts a vCPU thread stuck in KVM_RUN; it then sees the stop flag.
pub fn kick(handle: &JoinHandle<()>) {
    let _ = handle.kill(kick_signal());
}

fn run(vcpu: &mut VcpuFd, index: u8, ctx: &VcpuContext) {
    while !ctx.stop.load(Ordering::Acquire) {
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
