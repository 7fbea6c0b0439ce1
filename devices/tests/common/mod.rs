//! A tiny virtio driver for host-tier device tests: it lays split
//! virtqueues out in real guest memory, negotiates through the MMIO
//! registers exactly as Linux does, and runs the device's event loop.
//! Tests then put well-formed or hostile descriptors on the rings.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioTransport, DRIVER_INIT_SEQUENCE, STATUS_ALL_OK};
use devices::virtio::{RingMap, VirtioDevice};
use devices::BusDevice;
use devices::GuestMemory as GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 16 << 20;
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
pub const STATUS_NEEDS_RESET: u32 = 0x40;

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
}

pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub transport: MmioTransport,
    pub irq: EventFd,
    pub queues: Vec<QueueLayout>,
    pub rings: Arc<RingMap>,
    em: Option<EventManager<Subscriber>>,
}

/// Where the first queue's rings go; each queue takes 0x4_0000 after it.
pub const RINGS_BASE: u64 = 0x10_0000;

impl Driver {
    /// Brings `device` up to DRIVER_OK with queues of `size` entries.
    pub fn new<D>(device: D, size: u16) -> Driver
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let driver = Driver::unstarted(device, mem, RingMap::new());
        Driver::started(driver, size, RINGS_BASE)
    }

    /// A second device of the same VM: the same memory and ring map, its
    /// rings from `base`. It may fail to start (check `status`).
    pub fn sibling<D>(&self, device: D, size: u16, base: u64) -> Driver
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let mut d = Driver::unstarted(device, self.mem.clone(), self.rings.clone());
        d.set_up(size, base);
        d
    }

    fn started(mut driver: Driver, size: u16, base: u64) -> Driver {
        driver.set_up(size, base);
        assert_eq!(
            driver.status() & STATUS_NEEDS_RESET,
            0,
            "activation succeeded"
        );
        driver
    }

    fn unstarted<D>(device: D, mem: GuestMemoryMmap, rings: Arc<RingMap>) -> Driver
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let device = Arc::new(Mutex::new(device));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(
            device.clone(),
            mem.clone(),
            irq.try_clone().unwrap(),
            rings.clone(),
        )
        .unwrap();
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(device);
        Driver {
            mem,
            transport,
            irq,
            queues: Vec::new(),
            rings,
            em: Some(em),
        }
    }

    pub fn write_reg(&mut self, off: u64, v: u32) {
        self.transport.write(off, &v.to_le_bytes());
    }

    pub fn read_reg(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Negotiates exactly as Linux does and lays the queues out from
    /// `base`, then sets DRIVER_OK and runs the event loop.
    pub fn set_up(&mut self, size: u16, base: u64) {
        assert_eq!(self.read_reg(0), 0x7472_6976, "magic");
        assert_eq!(self.read_reg(4), 2, "version");
        self.write_reg(0x70, DRIVER_INIT_SEQUENCE[0]);
        self.write_reg(0x70, DRIVER_INIT_SEQUENCE[1]);
        for sel in 0..2u32 {
            self.write_reg(0x14, sel);
            let offered = self.read_reg(0x10);
            self.write_reg(0x24, sel);
            self.write_reg(0x20, offered);
        }
        self.write_reg(0x70, DRIVER_INIT_SEQUENCE[2]);
        assert_eq!(
            self.read_reg(0x70),
            DRIVER_INIT_SEQUENCE[2],
            "FEATURES_OK accepted"
        );
        self.queues.clear();
        let mut next = base;
        for q in 0..self.transport.queue_events().len() as u32 {
            self.write_reg(0x30, q);
            assert!(self.read_reg(0x34) >= u32::from(size));
            let layout = QueueLayout {
                size,
                desc: next,
                avail: next + 0x1_0000,
                used: next + 0x2_0000,
                next_avail: 0,
            };
            next += 0x4_0000;
            self.write_reg(0x38, u32::from(size));
            self.write_reg(0x80, layout.desc as u32);
            self.write_reg(0x84, 0);
            self.write_reg(0x90, layout.avail as u32);
            self.write_reg(0x94, 0);
            self.write_reg(0xa0, layout.used as u32);
            self.write_reg(0xa4, 0);
            self.write_reg(0x44, 1);
            // A fresh ring: nothing available, nothing used.
            self.mem
                .write_obj(0u16, GuestAddress(layout.avail + 2))
                .unwrap();
            self.mem
                .write_obj(0u16, GuestAddress(layout.used + 2))
                .unwrap();
            self.queues.push(layout);
        }
        self.write_reg(0x70, STATUS_ALL_OK);
        self.run();
    }

    /// Resets the device the way a driver does (status 0), and checks the
    /// device says it is reset.
    pub fn reset(&mut self) {
        self.write_reg(0x70, 0);
        self.run();
        assert_eq!(self.read_reg(0x70), 0, "the device reads as reset");
    }

    pub fn status(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(0x70, &mut b);
        u32::from_le_bytes(b)
    }

    /// Runs the device's event loop until nothing is pending.
    pub fn run(&mut self) {
        if let Some(em) = self.em.as_mut() {
            while em.run_with_timeout(1).unwrap() > 0 {}
        }
    }

    /// One round of the event loop: what one epoll wake-up dispatches.
    pub fn run_once(&mut self) -> i32 {
        let em = self.em.as_mut().expect("the event loop was taken");
        em.run_with_timeout(0).unwrap() as i32
    }

    /// Moves the event loop out, to run on a thread of the test's own.
    pub fn take_event_loop(&mut self) -> EventManager<Subscriber> {
        self.em.take().expect("the event loop was taken already")
    }

    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = self.queues[q].desc + u64::from(index) * 16;
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Writes a chain of (addr, len, writable) buffers starting at
    /// descriptor `first`, linked in order.
    pub fn write_chain(&self, q: usize, first: u16, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(q, index, addr, len, flags, index + 1);
        }
    }

    /// Makes `head` available and kicks the queue.
    pub fn submit(&mut self, q: usize, head: u16) {
        let layout = &mut self.queues[q];
        let slot = u64::from(layout.next_avail % layout.size);
        self.mem
            .write_obj(head, GuestAddress(layout.avail + 4 + slot * 2))
            .unwrap();
        layout.next_avail = layout.next_avail.wrapping_add(1);
        self.mem
            .write_obj(layout.next_avail, GuestAddress(layout.avail + 2))
            .unwrap();
        self.kick(q);
    }

    /// Publishes an arbitrary avail index (for hostile-ring tests).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.queues[q].next_avail = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.queues[q].avail + 2))
            .unwrap();
    }

    pub fn kick(&mut self, q: usize) {
        self.transport.queue_events()[q].write(1).unwrap();
        self.run();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.queues[q].used + 2))
            .unwrap()
    }

    /// The used-ring entry at position `n`: (descriptor id, length).
    pub fn used_entry(&self, q: usize, n: u16) -> (u32, u32) {
        let layout = &self.queues[q];
        let base = layout.used + 4 + u64::from(n % layout.size) * 8;
        (
            self.mem.read_obj(GuestAddress(base)).unwrap(),
            self.mem.read_obj(GuestAddress(base + 4)).unwrap(),
        )
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}
