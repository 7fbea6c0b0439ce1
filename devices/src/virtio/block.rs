//! virtio-blk backed by a raw file, read-only or read-write.

use std::io::{Read, Write};
use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};

use super::{
    drain_queue, read_config_bytes, ActivateError, Activation, ActivationSlot, DeviceState, Served,
    VirtioDevice, TYPE_BLOCK, VIRTIO_RING_F_EVENT_IDX,
};
use crate::disk::DiskImage;
use crate::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;

/// The name a snapshot gives layer `j` (from the bottom) of disk `disk`.
pub fn layer_name(disk: usize, j: usize) -> String {
    format!("disk{disk}.{j}.layer")
}
const QUEUE_SIZE: u16 = 256;

const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const REQ_IN: u32 = 0;
const REQ_OUT: u32 = 1;
const REQ_FLUSH: u32 = 4;
const REQ_GET_ID: u32 = 8;

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;

/// Bytes copied per step, so a huge guest buffer never means a huge host
/// allocation.
const COPY_CHUNK: usize = 128 * 1024;
/// Largest segment the driver may use (announced as `size_max`).
const SEGMENT_MAX: u32 = 256 * 1024;
/// Segments per request (announced as `seg_max`).
const SEGMENTS_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest request served: what `size_max` and `seg_max` allow. Anything
/// bigger (a hostile driver's chain of huge descriptors) is refused, so
/// one request is a bounded piece of work.
const REQUEST_MAX: usize = SEGMENT_MAX as usize * SEGMENTS_MAX as usize;
const ID_LEN: usize = 20;

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

/// Serializable device state (for snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub read_only: bool,
    pub capacity_sectors: u64,
}

pub struct Block {
    disk: DiskImage,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    slot: ActivationSlot,
}

impl Block {
    /// Opens a raw image as a disk.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let disk = DiskImage::open_raw(path, !read_only).map_err(|source| BlockError::Open {
            path: path.display().to_string(),
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
            slot: ActivationSlot::new()?,
        })
    }

    /// Freezes the disk as it is now and carries on writing to a new
    /// copy-on-write layer at `top` (a snapshot's disk): nothing writes
    /// the frozen files any more.
    pub fn freeze(&mut self, top: &Path) -> Result<(), BlockError> {
        self.disk.push_layer(top)?;
        Ok(())
    }

    /// Turns a read-only disk into a writable one whose writes go to a new
    /// copy-on-write layer at `top` (a restored snapshot's disk).
    pub fn writable_layer(mut self, top: &Path) -> Result<Block, BlockError> {
        self.disk.push_layer(top)?;
        self.read_only = false;
        Ok(self)
    }

    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// Keeps the frozen layers of disk `index` in the snapshot directory
    /// `dir` (every layer but the one the VM writes) as
    /// `disk<index>.<j>.layer`, bottom first; returns their names.
    pub fn keep_frozen_layers(
        &mut self,
        dir: &Path,
        index: usize,
    ) -> Result<Vec<String>, BlockError> {
        Ok(self
            .disk
            .keep_layers_in(dir, !self.read_only, &|j| layer_name(index, j))?)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    fn block_state(&self) -> BlockState {
        BlockState {
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
        }
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SEGMENT_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEGMENTS_MAX.to_le_bytes());
        c
    }
}

/// One request, parsed and executed. Returns the bytes written into the
/// chain (data read plus the status byte; 0 if the chain had no room for
/// a status byte at all) and the bytes moved.
struct Request;

impl Request {
    fn execute(
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        disk: &mut DiskImage,
        read_only: bool,
        capacity: u64,
        id: &[u8; ID_LEN],
    ) -> Served {
        const NOTHING: Served = Served { len: 0, bytes: 0 };
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(e) => {
                crate::guest_warn!("virtio-blk: bad request chain: {e:?}");
                return NOTHING;
            }
        };
        let mut writer = match chain.writer(mem) {
            Ok(w) => w,
            Err(e) => {
                crate::guest_warn!("virtio-blk: bad request chain: {e:?}");
                return NOTHING;
            }
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            crate::guest_warn!("virtio-blk: request without room for a status byte");
            return NOTHING;
        };
        let mut status_writer = match writer.split_at(data_len) {
            Ok(w) => w,
            Err(_) => return NOTHING,
        };
        let moved = data_len.max(reader.available_bytes()) as u64;
        let mut header = [0u8; 16];
        let status = if reader.read_exact(&mut header).is_err() {
            STATUS_IOERR
        } else {
            let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
            let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
            match kind {
                _ if data_len > REQUEST_MAX || reader.available_bytes() > REQUEST_MAX => {
                    crate::guest_warn!(
                        "virtio-blk: a request of more than {REQUEST_MAX} bytes (refused)"
                    );
                    STATUS_IOERR
                }
                REQ_IN => {
                    let len = writer.available_bytes();
                    read_disk(disk, sector, capacity, len, &mut writer)
                }
                REQ_OUT if read_only => STATUS_IOERR,
                REQ_OUT => {
                    let len = reader.available_bytes();
                    write_disk(disk, sector, capacity, len, &mut reader)
                }
                REQ_FLUSH if read_only => STATUS_OK,
                REQ_FLUSH => match disk.sync_data() {
                    Ok(()) => STATUS_OK,
                    Err(_) => STATUS_IOERR,
                },
                REQ_GET_ID => {
                    let n = writer.available_bytes().min(ID_LEN);
                    match writer.write_all(&id[..n]) {
                        Ok(()) => STATUS_OK,
                        Err(_) => STATUS_IOERR,
                    }
                }
                _ => STATUS_UNSUPP,
            }
        };
        if status_writer.write_all(&[status]).is_err() {
            return NOTHING;
        }
        Served {
            len: u32::try_from(writer.bytes_written() + 1).unwrap_or(u32::MAX),
            bytes: moved,
        }
    }
}

/// Checks that `len` bytes at `sector` lie inside the disk.
fn disk_range(sector: u64, len: usize, capacity: u64) -> Option<u64> {
    let start = sector.checked_mul(SECTOR_SIZE)?;
    let end = start.checked_add(len as u64)?;
    (end <= capacity).then_some(start)
}

/// Copies `len` bytes at `sector` from the disk into the guest.
fn read_disk(
    disk: &DiskImage,
    sector: u64,
    capacity: u64,
    len: usize,
    writer: &mut impl Write,
) -> u8 {
    let Some(mut offset) = disk_range(sector, len, capacity) else {
        return STATUS_IOERR;
    };
    let mut buf = vec![0u8; len.min(COPY_CHUNK)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        if disk.read_exact_at(&mut buf[..n], offset).is_err()
            || writer.write_all(&buf[..n]).is_err()
        {
            return STATUS_IOERR;
        }
        offset += n as u64;
        left -= n;
    }
    STATUS_OK
}

/// Copies `len` bytes from the guest to the disk at `sector`.
fn write_disk(
    disk: &mut DiskImage,
    sector: u64,
    capacity: u64,
    len: usize,
    reader: &mut impl Read,
) -> u8 {
    let Some(mut offset) = disk_range(sector, len, capacity) else {
        return STATUS_IOERR;
    };
    let mut buf = vec![0u8; len.min(COPY_CHUNK)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        if reader.read_exact(&mut buf[..n]).is_err()
            || disk.write_all_at(&buf[..n], offset).is_err()
        {
            return STATUS_IOERR;
        }
        offset += n as u64;
        left -= n;
    }
    STATUS_OK
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.slot.queues()
    }
    fn state(&self) -> DeviceState {
        DeviceState::Block(self.block_state())
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_RING_F_EVENT_IDX;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
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
        let (disk, read_only, id) = (&mut self.disk, self.read_only, &self.id);
        let capacity = self.capacity_sectors * SECTOR_SIZE;
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
                    Request::execute(mem, chain, disk, read_only, capacity, id)
                })
            });
    }
}
