//! The virtio-mmio transport (virtio 1.x, "version 2" register layout).
//!
//! The transport owns the registers, feature negotiation and queue setup.
//! Queue notifications do not come through here at all: each queue's
//! notify address is bound to an ioeventfd in KVM, so a guest kick wakes
//! the device's event loop without an exit to this process.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config as status;
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, Interrupt, RingMap, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::{lock, BusDevice};
use crate::GuestMemory;

/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of the queue-notify register, for binding ioeventfds.
pub const NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4353_5043; // "CPSC"
const CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

// Register offsets, as the bus hands them over.
const MAGIC_VALUE: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION_REG: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR_ID: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
const INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_AVAIL_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_AVAIL_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_USED_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_USED_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;

// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = status::VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = status::VIRTIO_CONFIG_S_DRIVER;
const STATUS_DRIVER_OK: u32 = status::VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FEATURES_OK: u32 = status::VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_NEEDS_RESET: u32 = status::VIRTIO_CONFIG_S_NEEDS_RESET;
const STATUS_FAILED: u32 = status::VIRTIO_CONFIG_S_FAILED;

/// Serializable transport state (for snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_status: u32,
    pub features_select: u32,
    pub acked_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// The device found its queues corrupt and stopped (DEVICE_NEEDS_RESET).
    pub device_failed: bool,
    pub queues: Vec<QueueSnapshot>,
}

/// Why a transport could not be rebuilt from a snapshot. Snapshot files
/// are untrusted: every value is checked before the guest sees it.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("the device has {expected} queues, the snapshot {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index}: {reason}")]
    Queue { index: usize, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Serializable state of one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        let s = q.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// The queue this snapshot describes, if its values are consistent
    /// (sizes, alignment, ring indices) for a queue of `max_size`.
    pub fn to_queue(&self, max_size: u16) -> Result<Queue, String> {
        if self.max_size != max_size {
            return Err(format!(
                "maximum size {} where the device has {max_size}",
                self.max_size
            ));
        }
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| format!("{e:?}"))
    }
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    /// The VM's active rings, and this transport's name among them.
    rings: Arc<RingMap>,
    ring_owner: u64,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_status: u32,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`. `irqfd` raises its interrupt; the transport creates
    /// one ioeventfd per queue, which the VMM binds with
    /// [`MmioTransport::queue_events`]. `rings` is shared by every
    /// transport of the VM.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        irqfd: EventFd,
        rings: Arc<RingMap>,
    ) -> std::io::Result<Self> {
        static OWNERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_events = Vec::with_capacity(max_sizes.len());
        for size in max_sizes {
            queues.push(Queue::new(size).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:?}"))
            })?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            rings,
            ring_owner: OWNERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queues,
            queue_events,
            device_status: 0,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Rebuilds a transport from a snapshot's `state` around `device`
    /// (itself restored). A device the driver had started is activated
    /// again at once, with `restored` set so it serves its queues once.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        irqfd: EventFd,
        rings: Arc<RingMap>,
        state: &MmioState,
    ) -> Result<Self, RestoreError> {
        let mut transport = MmioTransport::new(device, mem, irqfd, rings)?;
        if state.queues.len() != transport.queues.len() {
            return Err(RestoreError::QueueCount {
                expected: transport.queues.len(),
                got: state.queues.len(),
            });
        }
        for (index, (queue, saved)) in transport.queues.iter_mut().zip(&state.queues).enumerate() {
            *queue = saved
                .to_queue(queue.max_size())
                .map_err(|reason| RestoreError::Queue { index, reason })?;
        }
        transport.device_status = state.device_status;
        transport.features_select = state.features_select;
        transport.acked_features_select = state.acked_features_select;
        transport.acked_features = state.acked_features;
        transport.queue_select = state.queue_select;
        transport.config_generation = state.config_generation;
        transport
            .interrupt
            .restore(state.interrupt_status, state.device_failed);
        let running = state.device_status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED)
            == STATUS_DRIVER_OK;
        if running && !state.device_failed {
            transport.activate(true);
        }
        Ok(transport)
    }

    /// The per-queue notification eventfds, in queue order.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_type(&self) -> u32 {
        lock(&self.device).device_type()
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn state(&self) -> MmioState {
        MmioState {
            device_status: self.device_status,
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            device_failed: self.interrupt.device_failed(),
            queues: {
                let device = lock(&self.device);
                match device.active_queues() {
                    Some(active) if self.activated => {
                        active.iter().map(QueueSnapshot::of).collect()
                    }
                    _ => self.queues.iter().map(QueueSnapshot::of).collect(),
                }
            },
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may only change before DRIVER_OK.
    fn queue_configurable(&self) -> bool {
        self.device_status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED)
            == STATUS_FEATURES_OK
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_configurable() {
            crate::guest_warn!(
                "virtio-mmio: queue register written in status {:#x}",
                self.device_status
            );
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits, except through a reset.
        if status & self.device_status != self.device_status {
            crate::guest_warn!(
                "virtio-mmio: status {:#x} clears bits of {:#x}",
                status,
                self.device_status
            );
            return;
        }
        let added = status & !self.device_status;
        if added & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported; leaving FEATURES_OK unset
            // tells the driver so.
            self.device_status = status & !STATUS_FEATURES_OK;
            return;
        }
        if added & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            // Queues can only have been set up after FEATURES_OK.
            crate::guest_warn!("virtio-mmio: DRIVER_OK without FEATURES_OK");
            self.fail();
            return;
        }
        self.device_status = status;
        if added & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate(false);
        }
    }

    fn activate(&mut self, restored: bool) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !valid {
            crate::guest_error!("virtio-mmio: a ready queue lies outside guest memory");
            self.fail();
            return;
        }
        if let Err(why) = self.rings.claim(self.ring_owner, &self.queues) {
            crate::guest_error!("virtio-mmio: refusing to start the device: {why}");
            self.fail();
            return;
        }
        let queue_events: Result<Vec<_>, _> =
            self.queue_events.iter().map(EventFd::try_clone).collect();
        let queue_events = match queue_events {
            Ok(e) => e,
            Err(e) => {
                crate::guest_error!("virtio-mmio: {e}");
                self.fail();
                return;
            }
        };
        // The device gets its own copies of the queues (Queue is not Clone;
        // its state round-trips exactly).
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let Ok(mut queues) = queues else {
            self.fail();
            return;
        };
        // With EVENT_IDX the driver suppresses kicks and interrupts through
        // the ring's event fields; the queues must use them too, or the
        // driver stops kicking after its first request.
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            rings: self.rings.clone(),
            acked_features: self.acked_features,
            restored,
        };
        let result = lock(&self.device).activate(activation);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                crate::guest_error!("virtio-mmio: activation failed: {e}");
                self.fail();
            }
        }
    }

    fn fail(&mut self) {
        self.device_status |= STATUS_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    /// The driver wrote 0 to the status register: the device stops
    /// serving, and everything the driver set up is forgotten, so it can
    /// set the device up again (a driver rebind, a kexec, every guest
    /// power-off).
    fn reset(&mut self) {
        lock(&self.device).reset();
        self.rings.release(self.ring_owner);
        self.activated = false;
        self.device_status = 0;
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.interrupt.ack(u32::MAX);
        self.interrupt.clear_failure();
        for q in &mut self.queues {
            q.reset();
        }
    }
}

fn read_u32(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.try_into().ok()?))
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => {
                let features = lock(&self.device).features() | VIRTIO_F_VERSION_1;
                match self.features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => {
                if self.interrupt.device_failed() {
                    self.device_status | STATUS_NEEDS_RESET
                } else {
                    self.device_status
                }
            }
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.device_status & STATUS_DRIVER != 0 {
                lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            }
            return;
        }
        let Some(v) = read_u32(data) else {
            return;
        };
        match offset {
            DEVICE_FEATURES_SEL => self.features_select = v,
            DRIVER_FEATURES => {
                if self.device_status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
                    return;
                }
                // Only features we offered can be accepted.
                let offered = lock(&self.device).features() | VIRTIO_F_VERSION_1;
                let v = u64::from(v);
                match self.acked_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | v,
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
                self.acked_features &= offered;
            }
            DRIVER_FEATURES_SEL => self.acked_features_select = v,
            QUEUE_SEL => self.queue_select = v,
            QUEUE_NUM => self.with_queue(|q| q.set_size(v as u16)),
            QUEUE_READY => self.with_queue(|q| q.set_ready(v == 1)),
            // Notifications normally arrive as ioeventfds; a write that gets
            // here (no ioeventfd bound) is forwarded the same way.
            NOTIFY_OFFSET => {
                if let Some(evt) = self.queue_events.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            STATUS => self.set_status(v),
            QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}

/// Status bits a driver sets on the way to DRIVER_OK, for tests.
pub const DRIVER_INIT_SEQUENCE: [u32; 3] = [
    STATUS_ACKNOWLEDGE,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
];
/// The DRIVER_OK status value following [`DRIVER_INIT_SEQUENCE`].
pub const STATUS_ALL_OK: u32 =
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
