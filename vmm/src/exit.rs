//! Why a VM stopped, recorded once by whoever noticed first.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// The end of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself (reboot, or the agent's clean power-off:
    /// both end the VM).
    GuestReset,
    /// The guest powered itself off.
    GuestPowerOff,
    /// The host stopped the VM.
    Stopped,
    /// The guest kernel cannot run on this host's KVM.
    Unsupported(String),
    /// Something failed.
    Error(String),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::GuestReset => write!(f, "the guest reset"),
            VmExit::GuestPowerOff => write!(f, "the guest powered off"),
            VmExit::Stopped => write!(f, "stopped by the host"),
            VmExit::Unsupported(m) | VmExit::Error(m) => f.write_str(m),
        }
    }
}

pub struct ExitState {
    exit: Mutex<Option<VmExit>>,
    changed: Condvar,
    /// Wakes the device event loop, which then stops.
    wake: EventFd,
}

impl ExitState {
    pub fn new(wake: EventFd) -> Self {
        ExitState {
            exit: Mutex::new(None),
            changed: Condvar::new(),
            wake,
        }
    }

    /// Records `exit` unless an earlier one is already recorded.
    pub fn set(&self, exit: VmExit) {
        let mut slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match &exit {
                VmExit::Error(m) | VmExit::Unsupported(m) => log::error!("VM ended: {m}"),
                other => log::debug!("VM ended: {other}"),
            }
            *slot = Some(exit);
            self.changed.notify_all();
            let _ = self.wake.write(1);
        }
    }

    pub fn get(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until an exit is recorded, or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let slot = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match timeout {
            None => self
                .changed
                .wait_while(slot, |s| s.is_none())
                .unwrap_or_else(|p| p.into_inner()),
            Some(t) => {
                self.changed
                    .wait_timeout_while(slot, t, |s| s.is_none())
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
        slot.clone()
    }
}
