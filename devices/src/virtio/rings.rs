//! Where a VM's active virtqueues keep their rings.
//!
//! A device writes guest memory in two ways: its used ring, and the
//! buffers a driver hands it (a disk read, random bytes, a vsock packet).
//! If such a buffer lay over a ring of any queue, the device's own write
//! could publish new work: a disk read landing in its avail ring makes the
//! next request, and the device would serve it, and the next, forever,
//! with the guest idle. The same goes for one queue's used ring lying over
//! another's avail ring. No driver does either, so both are refused: rings
//! of all queues in a VM must not overlap when a device is started, and a
//! chain that asks a device to write over any ring is a malformed queue.

use std::sync::{Arc, RwLock};

use virtio_queue::{Queue, QueueT};

/// One claimed range of guest memory, `[start, end)`.
#[derive(Clone, Copy, Debug)]
struct Area {
    owner: u64,
    start: u64,
    end: u64,
}

/// The rings of every active virtqueue in one VM, shared by its
/// transports.
#[derive(Debug, Default)]
pub struct RingMap {
    areas: RwLock<Vec<Area>>,
}

impl RingMap {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Records `owner`'s ready queues, unless they overlap each other or
    /// another owner's. Replaces what `owner` had.
    pub fn claim(&self, owner: u64, queues: &[Queue]) -> Result<(), String> {
        let mut mine = Vec::new();
        for (i, q) in queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            for (what, start, len) in queue_areas(q) {
                let end = start
                    .checked_add(len)
                    .ok_or_else(|| format!("queue {i}'s {what} wraps around"))?;
                mine.push((i, what, Area { owner, start, end }));
            }
        }
        for (n, (i, what, a)) in mine.iter().enumerate() {
            for (j, other, b) in &mine[n + 1..] {
                if overlap(a, b) {
                    return Err(format!("queue {i}'s {what} overlaps queue {j}'s {other}"));
                }
            }
        }
        let mut areas = self.areas.write().unwrap_or_else(|p| p.into_inner());
        for (i, what, a) in &mine {
            if areas.iter().any(|b| b.owner != owner && overlap(a, b)) {
                return Err(format!(
                    "queue {i}'s {what} overlaps another device's virtqueue"
                ));
            }
        }
        areas.retain(|a| a.owner != owner);
        areas.extend(mine.into_iter().map(|(_, _, a)| a));
        Ok(())
    }

    /// Forgets `owner`'s queues (its device was reset).
    pub fn release(&self, owner: u64) {
        self.areas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a| a.owner != owner);
    }

    /// Whether `[addr, addr + len)` overlaps any active ring.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        let probe = Area {
            owner: 0,
            start: addr,
            end: addr.saturating_add(len),
        };
        self.areas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|a| overlap(a, &probe))
    }

    /// Whether any buffer of `chain` the device would write lies over a
    /// ring.
    pub fn chain_writes_rings<M>(&self, chain: &virtio_queue::DescriptorChain<M>) -> bool
    where
        M: std::ops::Deref + Clone,
        M::Target: vm_memory::GuestMemory,
    {
        chain
            .clone()
            .filter(|d| d.is_write_only())
            .any(|d| self.covers(d.addr().0, u64::from(d.len())))
    }
}

fn overlap(a: &Area, b: &Area) -> bool {
    a.start < b.end && b.start < a.end
}

/// The descriptor table, the avail ring and the used ring of `q`, each
/// with its event field: (name, address, length).
fn queue_areas(q: &Queue) -> [(&'static str, u64, u64); 3] {
    let size = u64::from(q.size());
    let state = q.state();
    [
        ("descriptor table", state.desc_table, 16 * size),
        ("avail ring", state.avail_ring, 6 + 2 * size),
        ("used ring", state.used_ring, 6 + 8 * size),
    ]
}
