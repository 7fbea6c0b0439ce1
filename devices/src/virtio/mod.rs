//! Virtio devices over the MMIO transport.
//!
//! A device implements [`VirtioDevice`] for configuration and activation and
//! `event_manager::MutEventSubscriber` for its I/O: queue notifications
//! arrive as ioeventfds (the guest's kick never leaves the kernel) and
//! interrupts go out through an irqfd.

pub mod block;
pub mod mmio;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

/// Feature bits common to every device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device ids (virtio spec 5).
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The interrupt line of one virtio-mmio device: the `InterruptStatus`
/// register plus the irqfd that raises the guest interrupt.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    /// Set by a device that found its queues corrupt and stopped.
    failed: std::sync::atomic::AtomicBool,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn signal_used_queue(&self) {
        self.raise(INT_USED_RING);
    }

    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            crate::guest_error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// The device stopped: the transport reports DEVICE_NEEDS_RESET and
    /// the driver hears about it through a configuration interrupt.
    pub fn signal_device_failure(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.signal_config_change();
    }

    pub fn device_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    pub fn clear_failure(&self) {
        self.failed.store(false, Ordering::SeqCst);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Puts back a snapshot's `InterruptStatus` and failure flag, raising
    /// the interrupt again if one was pending: the interrupt controller's
    /// own state may have consumed the edge, and a spurious interrupt is
    /// harmless while a lost one hangs the driver.
    pub fn restore(&self, status: u32, failed: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.failed.store(failed, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.irqfd.write(1) {
                crate::guest_error!("virtio: cannot raise interrupt: {e}");
            }
        }
    }
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    /// One ioeventfd per queue, signalled by the guest's notify write.
    pub queue_events: Vec<EventFd>,
    pub interrupt: std::sync::Arc<Interrupt>,
    pub acked_features: u64,
    /// The queues come from a snapshot: the driver may have kicked them
    /// just before it was taken, so the device serves each queue once
    /// without waiting for a notification.
    pub restored: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device expects {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot duplicate an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A device's own snapshot state (the transport's is [`mmio::MmioState`]):
/// what it takes to build the same device again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
    Rng,
    Vsock(vsock::VsockState),
}

/// The device side of a virtio device: identity, features, configuration
/// space and activation. The transport owns registers and queue setup.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// What a snapshot records about the device itself. Devices never have
    /// requests in flight at a snapshot: they serve each request to
    /// completion on the event loop, which is parked first.
    fn state(&self) -> DeviceState;
    /// The queues the device is serving, once activated: they, not the
    /// transport's copies from activation time, hold the ring positions
    /// a snapshot must record.
    fn active_queues(&self) -> Option<&[Queue]>;
    /// Largest size the driver may pick for each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space; out-of-range bytes
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and returns it to its initial state, handing back
    /// nothing; returns false if the device cannot be reset.
    fn reset(&mut self) -> bool {
        false
    }
}

/// Copies `src[offset..]` into `data`, zero-filling past the end: how every
/// device's configuration space answers reads.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset < src.len() {
        let n = data.len().min(src.len() - offset);
        data[..n].copy_from_slice(&src[offset..offset + n]);
    }
}

/// Event-loop token of a device's activation eventfd.
pub(crate) const ACTIVATE_TOKEN: u32 = u32::MAX;

/// The activation handshake shared by every device: the transport calls
/// `activate` on a vCPU thread, the device stores its queues and pokes this
/// eventfd, and the event loop (the only thread that may add epoll
/// interests) then subscribes to the queue eventfds.
pub(crate) struct ActivationSlot {
    event: EventFd,
    pub(crate) active: Option<Activation>,
}

impl ActivationSlot {
    pub(crate) fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(ActivationSlot {
            event: EventFd::new(libc::EFD_NONBLOCK)?,
            active: None,
        })
    }

    pub(crate) fn init(&self, ops: &mut event_manager::EventOps) {
        use event_manager::{EventSet, Events};
        if let Err(e) = ops.add(Events::with_data(&self.event, ACTIVATE_TOKEN, EventSet::IN)) {
            crate::guest_error!("virtio: cannot watch the activation event: {e:?}");
        }
    }

    /// Stores the activation and wakes the event loop.
    pub(crate) fn activate(
        &mut self,
        activation: Activation,
        expected_queues: usize,
    ) -> Result<(), ActivateError> {
        if activation.queues.len() != expected_queues {
            return Err(ActivateError::QueueCount {
                expected: expected_queues,
                got: activation.queues.len(),
            });
        }
        self.active = Some(activation);
        self.event.write(1).map_err(ActivateError::EventFd)
    }

    /// Handles the activation token in the event loop: subscribes to every
    /// queue eventfd, tagged with its queue index.
    pub(crate) fn on_activated(&self, ops: &mut event_manager::EventOps) {
        use event_manager::{EventSet, Events};
        let _ = self.event.read();
        if let Some(active) = &self.active {
            for (i, evt) in active.queue_events.iter().enumerate() {
                if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                    crate::guest_error!("virtio: cannot watch queue {i}: {e:?}");
                }
                if active.restored {
                    let _ = evt.write(1);
                }
            }
        }
    }

    /// Handles an event of a device with a single queue: the activation,
    /// or a notification, which `serve` answers by draining the queue. A
    /// queue that `serve` finds malformed stops the device.
    pub(crate) fn on_single_queue_event<F>(
        &mut self,
        events: event_manager::Events,
        ops: &mut event_manager::EventOps,
        device: &str,
        serve: F,
    ) where
        F: FnOnce(&mut Activation) -> Result<usize, virtio_queue::Error>,
    {
        match events.data() {
            ACTIVATE_TOKEN => self.on_activated(ops),
            0 => {
                let Some(active) = self.active.as_mut() else {
                    return;
                };
                let _ = active.queue_events[0].read();
                if let Err(e) = serve(active) {
                    crate::guest_error!("{device}: queue is malformed, stopping the device: {e:?}");
                    self.fail(ops);
                }
            }
            _ => {}
        }
    }

    /// Stops a device whose queues are corrupt: reports the failure to the
    /// driver and stops listening to the queues.
    pub(crate) fn fail(&mut self, ops: &mut event_manager::EventOps) {
        if let Some(active) = &self.active {
            active.interrupt.signal_device_failure();
        }
        self.deactivate(ops);
    }

    /// Unsubscribes the queue eventfds and forgets the activation.
    pub(crate) fn deactivate(&mut self, ops: &mut event_manager::EventOps) {
        use event_manager::{EventSet, Events};
        if let Some(active) = self.active.take() {
            for (i, evt) in active.queue_events.iter().enumerate() {
                let _ = ops.remove(Events::with_data(evt, i as u32, EventSet::IN));
            }
        }
    }
}

/// Takes every available chain of `queue`, hands it to `handle` (which
/// returns the number of bytes written into the chain), and puts it on the
/// used ring; raises the interrupt if the driver wants one. Notifications
/// are re-enabled only once the ring is empty, the standard race-free loop.
/// A corrupt ring (an avail index running ahead of the ring size, a queue
/// that was never made ready) is an error, never an endless loop.
pub(crate) fn drain_queue<F>(
    mem: &GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    mut handle: F,
) -> Result<usize, virtio_queue::Error>
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
{
    use virtio_queue::{QueueOwnedT, QueueT};
    if !queue.ready() {
        return Err(virtio_queue::Error::QueueNotReady);
    }
    let mut used = 0;
    let mut empty_rounds = 0;
    loop {
        queue.disable_notification(mem)?;
        // Collecting first lets `add_used` borrow the queue; `iter` checks
        // the avail index against the ring size.
        let chains: Vec<_> = queue.iter(mem)?.collect();
        if chains.is_empty() {
            // The ring keeps claiming work that cannot be read (an avail
            // ring outside memory): give up instead of spinning. A few
            // empty rounds are normal when the driver adds buffers while
            // notifications are being re-enabled.
            empty_rounds += 1;
            if empty_rounds > 16 {
                return Err(virtio_queue::Error::InvalidAvailRingIndex);
            }
        } else {
            empty_rounds = 0;
        }
        for chain in chains {
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(mem, head, len)?;
            used += 1;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if used > 0 && queue.needs_notification(mem)? {
        interrupt.signal_used_queue();
    }
    Ok(used)
}
