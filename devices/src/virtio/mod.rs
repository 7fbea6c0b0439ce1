//! Virtio devices over the MMIO transport.
//!
//! A device implements [`VirtioDevice`] for configuration and activation and
//! `event_manager::MutEventSubscriber` for its I/O: queue notifications
//! arrive as ioeventfds (the guest's kick never leaves the kernel) and
//! interrupts go out through an irqfd.

mod activation;
pub mod block;
mod drain;
pub mod mmio;
pub mod persist;
pub mod rings;
pub mod rng;
pub mod vsock;

pub(crate) use activation::{ActivationSlot, ACTIVATE_TOKEN};
pub(crate) use drain::{drain_queue, Drained, QueueError, Served};
pub use rings::RingMap;

use std::sync::atomic::{AtomicU32, Ordering};

use event_manager::MutEventSubscriber;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

/// The feature bit for feature number `bit` (virtio-bindings numbers them).
pub const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Feature bits common to every device.
pub const VIRTIO_F_VERSION_1: u64 = feature(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
pub const VIRTIO_RING_F_EVENT_IDX: u64 =
    feature(virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);

const INT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

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
    /// Every active ring of the VM: no buffer the device writes may lie
    /// over one (see [`rings`]).
    pub rings: std::sync::Arc<RingMap>,
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

/// The device side of a virtio device: identity, features, configuration
/// space and activation. The transport owns registers and queue setup.
///
/// Its I/O runs on the event loop ([`MutEventSubscriber`]) and it keeps
/// its own snapshot state ([`persist::Persist`]). Devices never have
/// requests in flight at a snapshot: they serve each request to
/// completion on the event loop, which is parked first.
pub trait VirtioDevice: MutEventSubscriber + persist::Persist + Send {
    /// The virtio device id (`virtio_bindings::virtio_ids`).
    fn device_type(&self) -> u32;
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
    /// Stops serving the queues and returns the device to its state
    /// before activation (the driver wrote 0 to the status register).
    /// Called with the device locked, so never while it serves a request.
    fn reset(&mut self);
    /// The VM has stopped and the event loop with it: close the host side
    /// (sockets, backends), so host programs see the end rather than wait.
    fn close_host(&mut self) {}
    /// Whether the guest's buffers on queue `index` wait for the host to
    /// fill them (vsock's receive queue) rather than carry requests the
    /// device takes at once: only the latter, left untaken, is the
    /// device's fault.
    fn queue_waits_for_host(&self, _index: usize) -> bool {
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
