//! One virtio-blk request: parsed from its chain, checked, executed.

use std::io::{Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

use super::{FlushPolicy, ID_LEN, REQUEST_MAX, SECTOR_SIZE};
use crate::disk::DiskImage;
use crate::virtio::Served;
use crate::GuestMemory;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Bytes copied per step, so a huge guest buffer never means a huge host
/// allocation.
const COPY_CHUNK: usize = 128 * 1024;

/// One request, parsed and executed. Returns the bytes written into the
/// chain (data read plus the status byte; 0 if the chain had no room for
/// a status byte at all) and the bytes moved.
pub(super) struct Request;

/// What a request is served against.
pub(super) struct Target<'a> {
    pub disk: &'a mut DiskImage,
    pub read_only: bool,
    /// In bytes.
    pub capacity: u64,
    pub id: &'a [u8; ID_LEN],
    pub flush: FlushPolicy,
    /// Every copy goes through this one buffer: no allocation (and, at
    /// this size, no mmap and page faults) per request.
    pub buf: &'a mut [u8],
}

/// The size of [`Target::buf`].
pub(super) const COPY_BUFFER: usize = COPY_CHUNK;

impl Request {
    pub(super) fn execute(
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        t: &mut Target,
    ) -> Served {
        let (read_only, capacity, flush) = (t.read_only, t.capacity, t.flush);
        const NOTHING: Served = Served { len: 0, bytes: 0 };
        let mut reader = match chain.clone().reader(mem) {
            Ok(r) => r,
            Err(e) => {
                crate::guest_warn!("virtio-blk: bad request chain: {e:?}");
                return NOTHING;
            }
        };
        let mut writer = match chain.clone().writer(mem) {
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
        // Data a read put into guest memory straight from the disk file,
        // past the writer.
        let mut direct = 0;
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
                VIRTIO_BLK_T_IN => {
                    let len = writer.available_bytes();
                    match t.disk.raw_file() {
                        Some(file) => {
                            let status = transfer_direct(
                                mem,
                                &chain,
                                file,
                                sector,
                                capacity,
                                len,
                                Direction::FromDisk,
                            );
                            if status == STATUS_OK {
                                direct = len;
                            }
                            status
                        }
                        None => read_disk(t.disk, t.buf, sector, capacity, len, &mut writer),
                    }
                }
                VIRTIO_BLK_T_OUT if read_only => STATUS_IOERR,
                VIRTIO_BLK_T_OUT => {
                    let len = reader.available_bytes();
                    match t.disk.raw_file() {
                        Some(file) => transfer_direct(
                            mem,
                            &chain,
                            file,
                            sector,
                            capacity,
                            len,
                            Direction::ToDisk,
                        ),
                        None => write_disk(t.disk, t.buf, sector, capacity, len, &mut reader),
                    }
                }
                VIRTIO_BLK_T_FLUSH if read_only || flush == FlushPolicy::Writeback => STATUS_OK,
                VIRTIO_BLK_T_FLUSH => match t.disk.sync_data() {
                    Ok(()) => STATUS_OK,
                    Err(_) => STATUS_IOERR,
                },
                VIRTIO_BLK_T_GET_ID => {
                    let n = writer.available_bytes().min(ID_LEN);
                    match writer.write_all(&t.id[..n]) {
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
            len: u32::try_from(writer.bytes_written() + direct + 1).unwrap_or(u32::MAX),
            bytes: moved,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FromDisk,
    ToDisk,
}

/// Moves a request's `len` data bytes between guest memory and a raw disk
/// file at `sector` with no copy in between: the guest's buffers are read
/// into or written from directly. For a read they are the chain's
/// device-writable buffers (the status byte after them stays the
/// writer's); for a write, its device-readable ones after the 16-byte
/// header.
fn transfer_direct(
    mem: &GuestMemory,
    chain: &virtio_queue::DescriptorChain<&GuestMemory>,
    file: &std::fs::File,
    sector: u64,
    capacity: u64,
    len: usize,
    direction: Direction,
) -> u8 {
    use std::io::{Seek, SeekFrom};
    use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};
    let Some(mut offset) = disk_range(sector, len, capacity) else {
        return STATUS_IOERR;
    };
    // The file's offset is the device's: it alone uses the descriptor's
    // position (everything else reads and writes at explicit offsets),
    // and a supervisor that handed the descriptor over has closed its
    // copy.
    let writable = direction == Direction::FromDisk;
    let mut skip = if writable { 0 } else { 16 };
    let mut left = len;
    let mut file = file;
    for desc in chain.clone() {
        if left == 0 {
            break;
        }
        if desc.is_write_only() != writable {
            continue;
        }
        let dlen = desc.len() as usize;
        let s = skip.min(dlen);
        skip -= s;
        let n = (dlen - s).min(left);
        if n == 0 {
            continue;
        }
        let Some(addr) = desc.addr().0.checked_add(s as u64) else {
            return STATUS_IOERR;
        };
        let Ok(mut slice) = mem.get_slice(GuestAddress(addr), n) else {
            return STATUS_IOERR;
        };
        if file.seek(SeekFrom::Start(offset)).is_err() {
            return STATUS_IOERR;
        }
        let moved = match direction {
            Direction::FromDisk => file.read_exact_volatile(&mut slice),
            Direction::ToDisk => file.write_all_volatile(&slice),
        };
        if moved.is_err() {
            return STATUS_IOERR;
        }
        offset += n as u64;
        left -= n;
    }
    if left == 0 {
        STATUS_OK
    } else {
        STATUS_IOERR
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
    buf: &mut [u8],
    sector: u64,
    capacity: u64,
    len: usize,
    writer: &mut impl Write,
) -> u8 {
    in_pieces(sector, len, capacity, buf.len(), |offset, n| {
        disk.read_exact_at(&mut buf[..n], offset)?;
        writer.write_all(&buf[..n])
    })
}

/// Copies `len` bytes from the guest to the disk at `sector`.
fn write_disk(
    disk: &mut DiskImage,
    buf: &mut [u8],
    sector: u64,
    capacity: u64,
    len: usize,
    reader: &mut impl Read,
) -> u8 {
    in_pieces(sector, len, capacity, buf.len(), |offset, n| {
        reader.read_exact(&mut buf[..n])?;
        disk.write_all_at(&buf[..n], offset)
    })
}

/// Runs `step(disk offset, length)` over the `len` bytes at `sector` in
/// pieces of at most `piece` bytes (the bounce buffer's size), stopping at
/// the first error; the range is checked against the disk first.
fn in_pieces(
    sector: u64,
    len: usize,
    capacity: u64,
    piece: usize,
    mut step: impl FnMut(u64, usize) -> std::io::Result<()>,
) -> u8 {
    let Some(mut offset) = disk_range(sector, len, capacity) else {
        return STATUS_IOERR;
    };
    let mut left = len;
    while left > 0 {
        let n = left.min(piece);
        if step(offset, n).is_err() {
            return STATUS_IOERR;
        }
        offset += n as u64;
        left -= n;
    }
    STATUS_OK
}
