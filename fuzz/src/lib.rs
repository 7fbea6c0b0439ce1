//! What the fuzz targets share: a virtio device brought up through its
//! MMIO registers against real guest memory, whose rings and buffers the
//! fuzzer then fills.

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{MmioTransport, DRIVER_INIT_SEQUENCE, STATUS_ALL_OK};
use devices::virtio::{RingMap, VirtioDevice};
use devices::{BusDevice, GuestMemory};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Guest memory size: small, so random addresses often land inside.
pub const MEM_SIZE: usize = 1 << 20;
/// Queue q's rings: descriptor table at RINGS + q * QUEUE_SPAN, avail ring
/// 0x1000 after it, used ring 0x2000 after it.
pub const RINGS: u64 = 0x1_0000;
pub const QUEUE_SPAN: u64 = 0x4000;

pub struct Harness {
    pub mem: GuestMemory,
    pub transport: MmioTransport,
    em: EventManager<Subscriber>,
}

impl Harness {
    /// Starts `device` with queues of `size` entries at the fixed layout.
    pub fn start<D>(device: D, size: u16) -> Harness
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let device = Arc::new(Mutex::new(device));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport =
            MmioTransport::new(device.clone(), mem.clone(), irq, RingMap::new()).unwrap();
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(device);
        let mut w = |off: u64, v: u32| transport.write(off, &v.to_le_bytes());
        w(0x70, DRIVER_INIT_SEQUENCE[0]);
        w(0x70, DRIVER_INIT_SEQUENCE[1]);
        for sel in 0..2u32 {
            w(0x24, sel);
            w(0x20, u32::MAX);
        }
        w(0x70, DRIVER_INIT_SEQUENCE[2]);
        let queues = transport.queue_events().len() as u64;
        for q in 0..queues {
            let base = RINGS + q * QUEUE_SPAN;
            let mut w = |off: u64, v: u32| transport.write(off, &v.to_le_bytes());
            w(0x30, q as u32);
            w(0x38, u32::from(size));
            w(0x80, base as u32);
            w(0x90, (base + 0x1000) as u32);
            w(0xa0, (base + 0x2000) as u32);
            w(0x44, 1);
        }
        transport.write(0x70, &STATUS_ALL_OK.to_le_bytes());
        let mut h = Harness { mem, transport, em };
        h.run(8);
        h
    }

    /// Copies `data` into guest memory at `addr` (as much as fits).
    pub fn load(&self, addr: u64, data: &[u8]) {
        let room = (MEM_SIZE as u64).saturating_sub(addr) as usize;
        let _ = self
            .mem
            .write_slice(&data[..data.len().min(room)], GuestAddress(addr));
    }

    pub fn kick(&mut self, queue: usize) {
        if let Some(evt) = self.transport.queue_events().get(queue) {
            let _ = evt.write(1);
        }
    }

    /// At most `rounds` rounds of the event loop (a device that comes
    /// back for more gets them; none may spin inside one).
    pub fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            if self.em.run_with_timeout(0).unwrap_or(0) == 0 {
                break;
            }
        }
    }
}

/// Where the structured layouts put buffers.
pub const BUFFERS: u64 = 0x8_0000;

/// Lays out queue `queue` from compact fuzz input, so the fuzzer spends
/// its bytes on what a driver decides rather than on finding valid
/// 64-bit addresses: an avail index and 16 ring entries, then 16
/// descriptors of 6 bytes (address in 32-byte steps from 0, over the
/// rings, the buffers at [`BUFFERS`] and past the end of memory; length;
/// flags; next). Returns
/// what is left of `data`, for the buffers.
pub fn lay_out_queue<'a>(h: &Harness, queue: u64, data: &'a [u8]) -> &'a [u8] {
    let base = RINGS + queue * QUEUE_SPAN;
    let take = |d: &'a [u8], n: usize| d.split_at(d.len().min(n));
    let (avail, rest) = take(data, 17);
    let (descs, rest) = take(rest, 16 * 6);
    if let Some((&idx, heads)) = avail.split_first() {
        let _ = h
            .mem
            .write_obj(u16::from(idx), GuestAddress(base + 0x1000 + 2));
        for (i, &head) in heads.iter().enumerate() {
            let _ = h.mem.write_obj(
                u16::from(head % 32),
                GuestAddress(base + 0x1000 + 4 + 2 * i as u64),
            );
        }
    }
    for (i, d) in descs.chunks_exact(6).enumerate() {
        let slot = u16::from_le_bytes([d[0], d[1]]);
        let addr = u64::from(slot) * 32;
        let len = u32::from(u16::from_le_bytes([d[2], d[3]])) * 4;
        let flags = u16::from(d[4] & 0x7);
        let next = u16::from(d[5] % 20);
        let at = base + 16 * i as u64;
        let _ = h.mem.write_obj(addr, GuestAddress(at));
        let _ = h.mem.write_obj(len, GuestAddress(at + 8));
        let _ = h.mem.write_obj(flags, GuestAddress(at + 12));
        let _ = h.mem.write_obj(next, GuestAddress(at + 14));
    }
    rest
}
