//! The device thread: one epoll loop serving every device, the guest's
//! i8042 reset line and the host's wake-up call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::virtio::persist::SharedDevice;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::Subscriber;
use crate::diagnose::Threads;
use crate::error::{Error, Result};
use crate::exit::{ExitState, VmExit};
use crate::gate::PauseGate;

/// Watches for the guest's i8042 reset and for the host's wake-up call.
pub struct Control {
    pub reset: EventFd,
    pub wake: EventFd,
    pub exit: Arc<ExitState>,
}

const RESET_TOKEN: u32 = 1;
const WAKE_TOKEN: u32 = 2;

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [(&self.reset, RESET_TOKEN), (&self.wake, WAKE_TOKEN)] {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                log::error!("cannot watch a control event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RESET_TOKEN => {
                let _ = self.reset.read();
                self.exit.set(VmExit::GuestReset);
            }
            _ => {
                let _ = self.wake.read();
            }
        }
    }
}

/// What the device thread shares with the VM.
pub struct LoopShared {
    pub stop: Arc<AtomicBool>,
    pub exit: Arc<ExitState>,
    pub gate: Arc<PauseGate>,
    pub threads: Arc<Threads>,
}

/// Starts the device thread. It runs until told to stop or the VM ends,
/// parks when the gate asks (a pause), and closes every device's host
/// side on the way out.
pub fn spawn(
    subscribers: Vec<Subscriber>,
    devices: Vec<SharedDevice>,
    shared: LoopShared,
) -> Result<JoinHandle<()>> {
    let mut event_manager: EventManager<Subscriber> =
        EventManager::new().map_err(|e| Error::Device(format!("event loop: {e:?}")))?;
    for s in subscribers {
        event_manager.add_subscriber(s);
    }
    let LoopShared {
        stop,
        exit,
        gate,
        threads,
    } = shared;
    let handle = std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            threads.register_current("devices");
            while !stop.load(Ordering::Acquire) && exit.get().is_none() {
                gate.park_if_requested(&stop);
                if let Err(e) = event_manager.run() {
                    exit.set(VmExit::Error(format!("device event loop: {e:?}")));
                }
            }
            // The VM is over: host programs talking to the guest must see
            // the connection close, not wait forever.
            for device in &devices {
                devices::bus::lock(device).close_host();
            }
        })?;
    Ok(handle)
}
