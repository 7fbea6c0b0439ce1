//! virtio-vsock, bridged to host Unix sockets (see [`muxer`]).

mod connection;
pub mod muxer;

use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

use super::{
    drain_queue, read_config_bytes, ActivateError, Activation, ActivationSlot, VirtioDevice,
    ACTIVATE_TOKEN, TYPE_VSOCK,
};
pub use muxer::{connect_to_guest, Muxer};

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const EVENT_QUEUE: u32 = 2;
/// Largest payload accepted in one packet (Linux uses at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;

/// Serializable device state (for snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: String,
}

pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    slot: ActivationSlot,
    broken: bool,
}

impl Vsock {
    /// A device for guest `cid` whose host side listens on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            slot: ActivationSlot::new()?,
            broken: false,
        })
    }

    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.muxer.path().display().to_string(),
        }
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
            interrupt,
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
            |mut chain| {
                match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                    Ok(pkt) => muxer.handle_guest_packet(&pkt, ops),
                    Err(e) => log::warn!("vsock: dropping malformed TX packet: {e}"),
                }
                0
            },
        );
        if let Err(e) = result {
            log::error!("vsock: TX queue is malformed, stopping the device: {e:?}");
            self.broken = true;
        }
    }

    fn process_rx(&mut self, ops: &mut EventOps) {
        let Some(Activation {
            mem,
            queues,
            interrupt,
            ..
        }) = self.slot.active.as_mut()
        else {
            return;
        };
        let queue = &mut queues[RX_QUEUE as usize];
        let mut used = 0;
        let result: Result<(), virtio_queue::Error> = (|| {
            while self.muxer.has_rx_work() {
                let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                let head = chain.head_index();
                match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_DATA) {
                    Ok(mut pkt) => {
                        if self.muxer.fill_rx(&mut pkt, ops) {
                            let len = PKT_HEADER_SIZE as u32 + pkt.len();
                            queue.add_used(&*mem, head, len)?;
                            used += 1;
                        } else {
                            queue.go_to_previous_position();
                            break;
                        }
                    }
                    Err(e) => {
                        log::warn!("vsock: unusable RX buffer: {e}");
                        queue.add_used(&*mem, head, 0)?;
                        used += 1;
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            log::error!("vsock: RX queue is malformed, stopping the device: {e:?}");
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
        TYPE_VSOCK
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
