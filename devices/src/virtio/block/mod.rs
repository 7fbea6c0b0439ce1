//! virtio-blk backed by a raw file, read-only or read-write.

mod persist;
mod request;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::{
    drain_queue, feature, read_config_bytes, ActivateError, Activation, ActivationSlot,
    VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
use crate::disk::DiskImage;
use crate::HostFile;
pub use persist::{layer_name, BlockState};
use request::{Request, Target};

pub const SECTOR_SIZE: u64 = 512;

const QUEUE_SIZE: u16 = 256;
/// Largest segment the driver may use (announced as `size_max`).
const SEGMENT_MAX: u32 = 256 * 1024;
/// Segments per request (announced as `seg_max`).
const SEGMENTS_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest request served: what `size_max` and `seg_max` allow. Anything
/// bigger (a hostile driver's chain of huge descriptors) is refused, so
/// one request is a bounded piece of work.
const REQUEST_MAX: usize = SEGMENT_MAX as usize * SEGMENTS_MAX as usize;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("disk image {0} is not a whole number of 512-byte sectors")]
    Size(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What a guest's flush request does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushPolicy {
    /// The disk's file is synced (`fdatasync`) before the flush completes:
    /// what the guest's filesystem was told is on disk survives a crash of
    /// the host. The safe default.
    #[default]
    Honour,
    /// Flushes complete at once and the host writes the data back when
    /// its page cache does: faster for sync-heavy work, and a guest or VMM
    /// crash loses nothing, but a host crash or power loss can lose (or
    /// tear) writes the guest believed durable.
    Writeback,
}

pub struct Block {
    disk: DiskImage,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    flush: FlushPolicy,
    /// The bounce buffer requests are copied through.
    buf: Vec<u8>,
    slot: ActivationSlot,
}

impl Block {
    /// Opens a raw image as a disk.
    pub fn open(image: impl Into<HostFile>, read_only: bool) -> Result<Self, BlockError> {
        let image = image.into();
        let opened = image
            .open(!read_only)
            .and_then(|file| DiskImage::raw(file, image.name()));
        let disk = opened.map_err(|source| BlockError::Open {
            path: image.name().display().to_string(),
            source,
        })?;
        Self::from_image(disk, read_only)
    }

    /// A disk over an image already open (a snapshot's chain, see
    /// [`crate::disk`]). Its id is the name of the raw image underneath.
    pub fn from_image(disk: DiskImage, read_only: bool) -> Result<Self, BlockError> {
        let base = disk.raw_base().path();
        let len = disk.size();
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size(base.display().to_string()));
        }
        let mut id = [0u8; ID_LEN];
        let name = base
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"disk");
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name[..n]);
        Ok(Block {
            disk,
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            id,
            flush: FlushPolicy::default(),
            buf: vec![0; request::COPY_BUFFER],
            slot: ActivationSlot::new()?,
        })
    }

    /// What the guest's flushes do from now on.
    pub fn set_flush_policy(&mut self, flush: FlushPolicy) {
        self.flush = flush;
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SEGMENT_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEGMENTS_MAX.to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }
    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.slot.queues()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_FLUSH)
            | VIRTIO_RING_F_EVENT_IDX;
        if self.read_only {
            f |= feature(VIRTIO_BLK_F_RO);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.slot.activate(activation, 1)
    }

    fn reset(&mut self) {
        self.slot.reset();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.slot.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut target = Target {
            disk: &mut self.disk,
            read_only: self.read_only,
            capacity: self.capacity_sectors * SECTOR_SIZE,
            id: &self.id,
            flush: self.flush,
            buf: &mut self.buf,
        };
        self.slot
            .on_single_queue_event(events, ops, "virtio-blk", |active| {
                let Activation {
                    mem,
                    queues,
                    interrupt,
                    rings,
                    ..
                } = active;
                drain_queue(mem, &mut queues[0], interrupt, rings, |chain| {
                    Request::execute(mem, chain, &mut target)
                })
            });
    }
}
