//! The VM's devices on their buses: MMIO windows and interrupt lines from
//! vm-allocator, each virtio device's queue notifications bound to
//! ioeventfds and its interrupt to an irqfd, so the guest's kicks and the
//! device's interrupts never leave the kernel.

use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::legacy::{Serial, SerialSnapshot, I8042};
use devices::virtio::mmio::{MmioState, MmioTransport, MMIO_LEN, NOTIFY_OFFSET};
use devices::virtio::persist::{SaveContext, SharedDevice};
use devices::virtio::RingMap;
use devices::{Bus, GuestMemory};
use event_manager::MutEventSubscriber;
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::layout::{
    COM1_IRQ, COM1_PORT, I8042_PORT, IOAPIC_PINS, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE,
};
use crate::persist::{DevicesState, VirtioSnapshot};

/// A subscriber of the device event loop.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The most virtio devices a VM may have: one interrupt line each, from
/// the IOAPIC pins above the legacy ones.
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize;

/// Where a virtio device sits, for the kernel command line.
#[derive(Clone, Copy, Debug)]
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
}

pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    mmio_space: AddressAllocator,
    irqs: IdAllocator,
    /// Handed to the event loop when the VM starts.
    subscribers: Vec<Subscriber>,
    pub serial: Option<Arc<Mutex<Serial>>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub slots: Vec<VirtioSlot>,
    /// Every active virtqueue ring of the VM, shared by the transports.
    rings: Arc<RingMap>,
}

fn device_error(e: impl std::fmt::Display) -> Error {
    Error::Device(e.to_string())
}

impl DeviceManager {
    pub fn new() -> Result<DeviceManager> {
        let mmio_space =
            AddressAllocator::new(VIRTIO_MMIO_BASE, MAX_VIRTIO_DEVICES as u64 * MMIO_LEN)
                .map_err(device_error)?;
        let irqs = IdAllocator::new(VIRTIO_IRQ_BASE, IOAPIC_PINS - 1).map_err(device_error)?;
        Ok(DeviceManager {
            pio: Bus::new(),
            mmio: Bus::new(),
            mmio_space,
            irqs,
            subscribers: Vec::new(),
            serial: None,
            transports: Vec::new(),
            slots: Vec::new(),
            rings: RingMap::new(),
        })
    }

    /// Adds an event loop subscriber that is not a device.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.subscribers.push(subscriber);
    }

    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.subscribers)
    }

    /// The serial console at COM1, writing to `sink` (from a snapshot's
    /// state if given), and the i8042, whose reset line is `reset`.
    pub fn add_legacy(
        &mut self,
        vm_fd: &VmFd,
        sink: Box<dyn std::io::Write + Send>,
        serial_state: Option<&SerialSnapshot>,
        reset: EventFd,
    ) -> Result<()> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(Error::kvm("wiring the serial interrupt"))?;
        let serial = match serial_state {
            None => Serial::new(serial_irq, sink),
            Some(state) => Serial::restore(state, serial_irq, sink).map_err(Error::Snapshot)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        self.pio
            .insert(COM1_PORT, 8, serial.clone())
            .map_err(device_error)?;
        self.serial = Some(serial);
        self.pio
            .insert(I8042_PORT, 5, Arc::new(Mutex::new(I8042::new(reset))))
            .map_err(device_error)?;
        Ok(())
    }

    /// Puts a virtio device on the next MMIO window with its interrupt and
    /// queue notifications wired into KVM; with `state`, the transport
    /// picks up where a snapshot left it.
    pub fn add_virtio(
        &mut self,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        device: SharedDevice,
        state: Option<&MmioState>,
    ) -> Result<VirtioSlot> {
        let i = self.transports.len();
        let full = |_| Error::Config(format!("at most {MAX_VIRTIO_DEVICES} devices"));
        let window = self
            .mmio_space
            .allocate(MMIO_LEN, MMIO_LEN, AllocPolicy::FirstMatch)
            .map_err(full)?;
        let irq = self.irqs.allocate_id().map_err(full)?;
        let base = window.start();
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        // Registered before a restored transport can re-raise a pending
        // interrupt through it.
        vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(Error::kvm("wiring a virtio interrupt"))?;
        let transport = match state {
            None => MmioTransport::new(device.clone(), mem.clone(), irqfd, self.rings.clone())?,
            Some(state) => MmioTransport::restore(
                device.clone(),
                mem.clone(),
                irqfd,
                self.rings.clone(),
                state,
            )
            .map_err(|e| Error::Snapshot(format!("virtio device {i}: {e}")))?,
        };
        for (q, evt) in transport.queue_events().iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(Error::kvm("binding a queue notification"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, MMIO_LEN, transport.clone())
            .map_err(device_error)?;
        self.transports.push(transport);
        self.subscribers.push(Box::new(device));
        let slot = VirtioSlot { base, irq };
        self.slots.push(slot);
        Ok(slot)
    }
}

/// The virtio devices of a running VM, in bus order.
pub fn virtio_devices(transports: &[Arc<Mutex<MmioTransport>>]) -> Vec<SharedDevice> {
    transports
        .iter()
        .map(|t| devices::bus::lock(t).device().clone())
        .collect()
}

/// Every device's state, in bus order; each device saves itself (a disk
/// freezes into `work_dir` and keeps its layers in `snapshot_dir`).
pub fn save_devices(
    serial: &Arc<Mutex<Serial>>,
    transports: &[Arc<Mutex<MmioTransport>>],
    snapshot_dir: &Path,
    work_dir: &Path,
) -> Result<DevicesState> {
    let mut kinds: Vec<u32> = Vec::new();
    let mut virtio = Vec::with_capacity(transports.len());
    for (n, t) in transports.iter().enumerate() {
        let t = devices::bus::lock(t);
        let mut device = devices::bus::lock(t.device());
        let kind = device.device_type();
        let index = kinds.iter().filter(|k| **k == kind).count();
        kinds.push(kind);
        let ctx = SaveContext {
            snapshot_dir,
            work_dir,
            index,
        };
        let saved = device
            .save(&ctx)
            .map_err(|e| Error::Snapshot(format!("saving virtio device {n}: {e}")))?;
        drop(device);
        virtio.push(VirtioSnapshot {
            transport: t.state(),
            device: saved,
        });
    }
    Ok(DevicesState {
        serial: devices::bus::lock(serial).state(),
        virtio,
    })
}
