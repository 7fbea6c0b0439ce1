//! Serving a virtqueue, a bounded amount at a time.
//!
//! One wake-up of a device serves at most [`CHAINS_PER_WAKE`] requests or
//! [`BYTES_PER_WAKE`] bytes, whichever comes first; if work is left, the
//! device schedules itself again behind whatever else the event loop has
//! (other devices, a pause, a stop). So a guest that keeps a queue full,
//! however it does it, gets its turn and no more, and the loop answers
//! pause and teardown within one budget.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};

use super::{Interrupt, RingMap};
use crate::GuestMemory;

/// Requests served per wake-up at most.
pub(crate) const CHAINS_PER_WAKE: usize = 64;
/// Bytes moved per wake-up at most (one request may take it past this).
pub(crate) const BYTES_PER_WAKE: u64 = 8 << 20;

/// What serving one chain came to.
pub(crate) struct Served {
    /// Bytes written into the chain, for the used ring.
    pub len: u32,
    /// Bytes moved either way, for the budget.
    pub bytes: u64,
}

/// How far a drain got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// The ring is empty and notifications are on again.
    Done,
    /// The budget ran out with work left: the caller must come back (its
    /// queue's eventfd is the way).
    More,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum QueueError {
    #[error("{0:?}")]
    Queue(#[from] virtio_queue::Error),
    /// A chain asked the device to write over a ring (see [`super::rings`]).
    #[error("a buffer the device would write lies over a virtqueue ring")]
    WritesRings,
}

/// Takes available chains of `queue`, hands each to `handle`, and puts it
/// on the used ring; raises the interrupt if the driver wants one.
/// Notifications are re-enabled only once the ring is empty, the standard
/// race-free loop. A corrupt ring (an avail index running ahead of the
/// ring size, a queue never made ready, a buffer over a ring) is an error,
/// never an endless loop.
pub(crate) fn drain_queue<F>(
    mem: &GuestMemory,
    queue: &mut Queue,
    interrupt: &Interrupt,
    rings: &RingMap,
    mut handle: F,
) -> Result<Drained, QueueError>
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> Served,
{
    if !queue.ready() {
        return Err(virtio_queue::Error::QueueNotReady.into());
    }
    let mut used = 0;
    let mut bytes = 0u64;
    let mut empty_rounds = 0;
    let outcome = loop {
        queue.disable_notification(mem)?;
        // Collecting first lets `add_used` borrow the queue; `iter` checks
        // the avail index against the ring size.
        let chains: Vec<_> = queue.iter(mem)?.take(CHAINS_PER_WAKE - used).collect();
        if chains.is_empty() {
            // The ring keeps claiming work that cannot be read (an avail
            // ring outside memory): give up instead of spinning. A few
            // empty rounds are normal when the driver adds buffers while
            // notifications are being re-enabled.
            empty_rounds += 1;
            if empty_rounds > 16 {
                return Err(virtio_queue::Error::InvalidAvailRingIndex.into());
            }
        } else {
            empty_rounds = 0;
        }
        for chain in chains {
            if rings.chain_writes_rings(&chain) {
                return Err(QueueError::WritesRings);
            }
            let head = chain.head_index();
            let served = handle(chain);
            queue.add_used(mem, head, served.len)?;
            used += 1;
            bytes = bytes.saturating_add(served.bytes);
        }
        if used >= CHAINS_PER_WAKE || bytes >= BYTES_PER_WAKE {
            break Drained::More;
        }
        if !queue.enable_notification(mem)? {
            break Drained::Done;
        }
    };
    if used > 0 && queue.needs_notification(mem)? {
        interrupt.signal_used_queue();
    }
    Ok(outcome)
}
