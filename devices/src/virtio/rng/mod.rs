//! virtio-rng: fills the guest's buffers from the host's /dev/urandom, so
//! the guest's entropy pool is ready early.

use std::fs::File;
use std::io::{Read, Write};

use event_manager::{EventOps, Events, MutEventSubscriber};

mod persist;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::{
    drain_queue, ActivateError, Activation, ActivationSlot, Drained, QueueError, Served,
    VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};

const QUEUE_SIZE: u16 = 64;
/// Most bytes handed out per request.
const MAX_REQUEST: usize = 64 * 1024;

pub struct Rng {
    source: File,
    slot: ActivationSlot,
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng {
            source: File::open("/dev/urandom")?,
            slot: ActivationSlot::new()?,
        })
    }
}

/// Fills each buffer with up to `MAX_REQUEST` random bytes.
fn serve(source: &mut File, active: &mut Activation) -> Result<Drained, QueueError> {
    let Activation {
        mem,
        queues,
        interrupt,
        rings,
        ..
    } = active;
    let mut buf = vec![0u8; MAX_REQUEST];
    drain_queue(mem, &mut queues[0], interrupt, rings, |chain| {
        const NOTHING: Served = Served { len: 0, bytes: 0 };
        let Ok(mut writer) = chain.writer(mem) else {
            return NOTHING;
        };
        let n = writer.available_bytes().min(MAX_REQUEST);
        if source.read_exact(&mut buf[..n]).is_err() || writer.write_all(&buf[..n]).is_err() {
            return NOTHING;
        }
        Served {
            len: n as u32,
            bytes: n as u64,
        }
    })
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.slot.queues()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.slot.activate(activation, 1)
    }
    fn reset(&mut self) {
        self.slot.reset();
    }
}

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.slot.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let source = &mut self.source;
        self.slot
            .on_single_queue_event(events, ops, "virtio-rng", |active| serve(source, active));
    }
}
