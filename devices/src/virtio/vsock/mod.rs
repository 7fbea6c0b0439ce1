//! virtio-vsock, bridged to host Unix sockets (see [`muxer`]).

mod connection;
pub mod muxer;
mod persist;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

use super::drain::{BYTES_PER_WAKE, CHAINS_PER_WAKE};
use super::{
    drain_queue, read_config_bytes, ActivateError, Activation, ActivationSlot, Drained, QueueError,
    Served, VirtioDevice, ACTIVATE_TOKEN,
};
pub use muxer::{connect_to_guest, Muxer};
pub use persist::VsockState;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const EVENT_QUEUE: u32 = 2;
/// Largest payload accepted in one packet (Linux uses at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;

pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    slot: ActivationSlot,
    broken: bool,
    /// The driver reset the device: the event loop closes every
    /// connection (it alone may change what epoll watches).
    connections_to_reset: bool,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            slot: ActivationSlot::new()?,
            broken: false,
            connections_to_reset: false,
        })
    }

    /// Closes the host side once the VM has stopped (see
    /// [`Muxer::disconnect_host`]).
    pub fn disconnect_host(&mut self) {
        self.muxer.disconnect_host();
    }

    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some(Activation {
            mem,
            queues,
            queue_events,
            interrupt,
            rings,
            ..
        }) = self.slot.active.as_mut()
        else {
            return;
        };
        let muxer = &mut self.muxer;
        let result = drain_queue(
            mem,
            &mut queues[TX_QUEUE as usize],
            interrupt,
            rings,
            |mut chain| {
                let bytes = match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => {
                        muxer.handle_guest_packet(&pkt, ops);
                        PKT_HEADER_SIZE as u64 + u64::from(pkt.len())
                    }
                    Err(e) => {
                        crate::guest_warn!("vsock: dropping malformed TX packet: {e}");
                        PKT_HEADER_SIZE as u64
                    }
                };
                Served { len: 0, bytes }
            },
        );
        match result {
            Ok(Drained::Done) => {}
            // Back for the rest after whatever else is waiting.
            Ok(Drained::More) => {
                let _ = queue_events[TX_QUEUE as usize].write(1);
            }
            Err(e) => {
                crate::guest_error!("vsock: TX queue is malformed, stopping the device: {e}");
                self.broken = true;
            }
        }
    }

    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(Activation {
            mem,
            queues,
            queue_events,
            interrupt,
            rings,
            ..
        }) = self.slot.active.as_mut()
        else {
            return;
        };
        let queue = &mut queues[RX_QUEUE as usize];
        let mut used = 0;
        let mut bytes = 0u64;
        let result: Result<(), QueueError> = (|| {
            while self.muxer.has_rx_work() {
                if used >= CHAINS_PER_WAKE || bytes >= BYTES_PER_WAKE {
                    // Back for the rest after whatever else is waiting.
                    let _ = queue_events[RX_QUEUE as usize].write(1);
                    break;
                }
                let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                if rings.chain_writes_rings(&chain) {
                    return Err(QueueError::WritesRings);
                }
                let head = chain.head_index();
                match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                    Ok(mut pkt) => {
                        if self.muxer.fill_rx(&mut pkt, ops) {
                            let len = PKT_HEADER_SIZE as u32 + pkt.len();
                            queue.add_used(&*mem, head, len)?;
                            used += 1;
                            bytes += u64::from(len);
                        } else {
                            queue.go_to_previous_position();
                            break;
                        }
                    }
                    Err(e) => {
                        crate::guest_warn!("vsock: unusable RX buffer: {e}");
                        queue.add_used(&*mem, head, 0)?;
                        used += 1;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            crate::guest_error!("vsock: RX queue is malformed, stopping the device: {e}");
            self.broken = true;
            return;
        }
        if used > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }
    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.slot.queues()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.slot.activate(activation, 3)
    }
    fn reset(&mut self) {
        self.slot.reset();
        self.connections_to_reset = true;
        self.broken = false;
    }
    fn close_host(&mut self) {
        self.disconnect_host();
    }
    fn queue_waits_for_host(&self, index: usize) -> bool {
        index == RX_QUEUE as usize || index == EVENT_QUEUE as usize
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.slot.init(ops);
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        match token {
            ACTIVATE_TOKEN => {
                if std::mem::take(&mut self.connections_to_reset) {
                    self.muxer.reset_all(ops);
                }
                self.slot.on_activated(ops);
                return;
            }
            RX_QUEUE | TX_QUEUE | EVENT_QUEUE => {
                if let Some(a) = &self.slot.active {
                    let _ = a.queue_events[token as usize].read();
                }
            }
            _ => self.muxer.handle_event(token, events.event_set(), ops),
        }
        if self.broken || self.slot.active.is_none() {
            return;
        }
        // Guest packets first: they may carry credit that lets RX proceed.
        if token == TX_QUEUE {
            self.process_tx(ops);
        }
        self.process_rx(ops);
        if self.broken {
            self.muxer.reset_all(ops);
            self.slot.fail(ops);
        }
    }
}
