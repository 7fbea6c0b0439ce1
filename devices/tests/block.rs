//! virtio-blk against real guest memory, well-formed and hostile.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::*;
use devices::virtio::block::Block;
use devices::virtio::persist::{RestoreContext, SaveContext, SavedDevice};
use devices::HostFile;

const HDR: u64 = 0x80_0000;
const DATA: u64 = 0x81_0000;
const STATUS: u64 = 0x90_0000;
const DISK_SIZE: u64 = 1 << 20;

const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const OK: u8 = 0;
const IOERR: u8 = 1;
const UNSUPP: u8 = 2;

fn disk() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let data: Vec<u8> = (0..DISK_SIZE)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    std::fs::write(&path, data).unwrap();
    (dir, path)
}

fn setup(read_only: bool) -> (tempfile::TempDir, std::path::PathBuf, Driver) {
    let (dir, path) = disk();
    let driver = Driver::new(Block::open(&path, read_only).unwrap(), 16);
    (dir, path, driver)
}

fn header(d: &Driver, kind: u32, sector: u64) {
    let mut h = Vec::new();
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    d.write(HDR, &h);
}

/// Submits header + data + status and returns (status, used length).
fn request(
    d: &mut Driver,
    kind: u32,
    sector: u64,
    data_len: u32,
    data_writable: bool,
) -> (u8, u32) {
    header(d, kind, sector);
    d.write(STATUS, &[0xff]);
    let mut bufs = vec![(HDR, 16, false)];
    if data_len > 0 {
        bufs.push((DATA, data_len, data_writable));
    }
    bufs.push((STATUS, 1, true));
    d.write_chain(0, 0, &bufs);
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_idx(0), before.wrapping_add(1), "request completed");
    let (_, len) = d.used_entry(0, before);
    (d.read(STATUS, 1)[0], len)
}

fn assert_still_works(d: &mut Driver, path: &std::path::Path) {
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0, "device still healthy");
    let (status, len) = request(d, IN, 1, 512, true);
    assert_eq!(status, OK);
    assert_eq!(len, 513);
    let expected = &std::fs::read(path).unwrap()[512..1024];
    assert_eq!(d.read(DATA, 512), expected);
}

#[test]
fn reads_writes_flushes_and_identifies() {
    let (_dir, path, mut d) = setup(false);
    // Config space: capacity in sectors.
    let mut cap = [0u8; 8];
    devices::BusDevice::read(&mut d.transport, 0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);

    assert_still_works(&mut d, &path);

    d.write(DATA, &[0xab; 1024]);
    assert_eq!(request(&mut d, OUT, 10, 1024, false), (OK, 1));
    let mut f = std::fs::File::open(&path).unwrap();
    f.seek(SeekFrom::Start(10 * 512)).unwrap();
    let mut buf = vec![0u8; 1024];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(buf, vec![0xab; 1024]);

    assert_eq!(request(&mut d, FLUSH, 0, 0, false).0, OK);
    let (status, len) = request(&mut d, GET_ID, 0, 20, true);
    assert_eq!(status, OK);
    assert_eq!(len, 21);
    assert_eq!(&d.read(DATA, 8), b"disk.img");
    assert_eq!(request(&mut d, 99, 0, 0, false).0, UNSUPP);
    assert!(d.irq.read().is_ok(), "completions raised the interrupt");
}

#[test]
fn out_of_range_requests_fail_with_ioerr() {
    let (_dir, path, mut d) = setup(false);
    let last = DISK_SIZE / 512;
    assert_eq!(request(&mut d, IN, last, 512, true).0, IOERR);
    assert_eq!(request(&mut d, IN, last - 1, 1024, true).0, IOERR);
    assert_eq!(request(&mut d, OUT, last, 512, false).0, IOERR);
    // Sector numbers that overflow when turned into byte offsets.
    assert_eq!(request(&mut d, IN, u64::MAX, 512, true).0, IOERR);
    assert_eq!(request(&mut d, IN, u64::MAX / 512 + 1, 512, true).0, IOERR);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        DISK_SIZE,
        "file never grew"
    );
    assert_still_works(&mut d, &path);
}

#[test]
fn read_only_disks_refuse_writes() {
    let (_dir, path, mut d) = setup(true);
    let before = std::fs::read(&path).unwrap();
    d.write(DATA, &[0xcd; 512]);
    assert_eq!(request(&mut d, OUT, 0, 512, false).0, IOERR);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_still_works(&mut d, &path);
}

#[test]
fn descriptor_loop_is_bounded() {
    let (_dir, path, mut d) = setup(false);
    header(&d, IN, 0);
    // 0 -> 1 -> 2 -> 0 -> ...: the chain never ends.
    d.write_desc(0, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
    d.write_desc(0, 1, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2);
    d.write_desc(0, 2, STATUS, 1, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_idx(0), before.wrapping_add(1));
    assert_still_works(&mut d, &path);
}

#[test]
fn out_of_memory_addresses_are_refused() {
    let (_dir, path, mut d) = setup(false);
    for addr in [MEM_SIZE as u64, u64::MAX - 8, 0xffff_ffff_0000] {
        header(&d, IN, 0);
        d.write_chain(
            0,
            0,
            &[(HDR, 16, false), (addr, 512, true), (STATUS, 1, true)],
        );
        let before = d.used_idx(0);
        d.submit(0, 0);
        assert_eq!(
            d.used_idx(0),
            before.wrapping_add(1),
            "refused, not dropped"
        );
        assert_eq!(d.used_entry(0, before).1, 0, "nothing written");
        // The header itself outside memory.
        d.write_chain(0, 0, &[(addr, 16, false), (STATUS, 1, true)]);
        d.submit(0, 0);
    }
    assert_still_works(&mut d, &path);
}

#[test]
fn zero_length_and_oversized_buffers_are_refused() {
    let (_dir, path, mut d) = setup(false);
    // Zero-length header: cannot be parsed, so the request fails.
    d.write(STATUS, &[0xff]);
    d.write_chain(
        0,
        0,
        &[(HDR, 0, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_idx(0), before.wrapping_add(1));
    assert_eq!(d.read(STATUS, 1)[0], IOERR);
    // Zero-length status: nowhere to report, completed with length 0.
    header(&d, IN, 0);
    d.write_chain(
        0,
        0,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 0, true)],
    );
    d.submit(0, 0);
    // A buffer claiming 4 GiB.
    d.write_chain(
        0,
        0,
        &[(HDR, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)],
    );
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_entry(0, before).1, 0);
    // A read far bigger than the disk, inside guest memory.
    assert_eq!(request(&mut d, IN, 0, 4 << 20, true).0, IOERR);
    // Only readable descriptors: no room for a status byte.
    header(&d, IN, 0);
    d.write_chain(0, 0, &[(HDR, 16, false), (DATA, 512, false)]);
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_entry(0, before).1, 0);
    assert_still_works(&mut d, &path);
}

#[test]
fn hostile_indirect_tables_are_refused() {
    let (_dir, path, mut d) = setup(false);
    // An indirect table whose length is not a multiple of 16, one outside
    // memory, and one that points at itself.
    for (addr, len) in [(DATA, 17u32), (MEM_SIZE as u64, 64), (DATA, 0)] {
        d.write_desc(0, 0, addr, len, VRING_DESC_F_INDIRECT, 0);
        d.submit(0, 0);
    }
    d.write(DATA, &{
        let mut t = Vec::new();
        t.extend_from_slice(&DATA.to_le_bytes());
        t.extend_from_slice(&16u32.to_le_bytes());
        t.extend_from_slice(&(VRING_DESC_F_INDIRECT).to_le_bytes());
        t.extend_from_slice(&0u16.to_le_bytes());
        t
    });
    d.write_desc(0, 0, DATA, 16, VRING_DESC_F_INDIRECT, 0);
    d.submit(0, 0);
    assert_still_works(&mut d, &path);
}

#[test]
fn a_broken_ring_stops_only_this_device() {
    let (_dir, _path, mut d) = setup(false);
    // A head index beyond the queue: the ring itself is corrupt.
    let size = d.queues[0].size;
    d.submit(0, size + 5);
    // The avail index jumping far past the ring size.
    let idx = d.queues[0].next_avail.wrapping_add(1000);
    d.set_avail_idx(0, idx);
    d.kick(0);
    assert_ne!(
        d.status() & STATUS_NEEDS_RESET,
        0,
        "the device reports it needs a reset"
    );
    // Further kicks are ignored, without panics.
    d.kick(0);
}

#[test]
fn disk_size_must_be_whole_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.img");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&[0; 1000])
        .unwrap();
    assert!(Block::open(&path, false).is_err());
    assert!(Block::open(dir.path().join("missing.img"), false).is_err());
}

#[test]
fn event_idx_is_honoured() {
    let (_dir, path, mut d) = setup(false);
    // The driver accepted VIRTIO_RING_F_EVENT_IDX (the test driver accepts
    // every offered feature), so the device must publish where it wants
    // the next kick (avail_event, after the used ring) or a Linux driver
    // stops kicking.
    let avail_event_addr = d.queues[0].used + 4 + 8 * u64::from(d.queues[0].size);
    for n in 1..=3u16 {
        assert_still_works(&mut d, &path);
        let avail_event: u16 = d
            .read(avail_event_addr, 2)
            .iter()
            .rev()
            .fold(0, |a, &b| (a << 8) | u16::from(b));
        assert_eq!(
            avail_event, n,
            "device asks to be kicked at the next request"
        );
    }
    // used_event (after the avail ring) far ahead: no interrupt for this one.
    let used_event_addr = d.queues[0].avail + 4 + 2 * u64::from(d.queues[0].size);
    d.write(used_event_addr, &100u16.to_le_bytes());
    let _ = d.irq.read();
    assert_still_works(&mut d, &path);
    assert!(
        d.irq.read().is_err(),
        "interrupt suppressed as the driver asked"
    );
}

#[test]
fn an_avail_index_running_ahead_of_the_ring_stops_the_device() {
    let (_dir, _path, mut d) = setup(false);
    // Nothing valid was ever submitted: the very first kick already lies.
    d.set_avail_idx(0, 1000);
    d.kick(0);
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    d.kick(0);
}

#[test]
fn driver_ok_without_features_ok_is_refused() {
    use devices::virtio::mmio::MmioTransport;
    use devices::BusDevice;
    let (_dir, path) = disk();
    let mem = devices::GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    let device = std::sync::Arc::new(std::sync::Mutex::new(Block::open(&path, false).unwrap()));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(device, mem, irq, devices::virtio::RingMap::new()).unwrap();
    t.write(0x70, &1u32.to_le_bytes());
    t.write(0x70, &3u32.to_le_bytes());
    t.write(0x70, &7u32.to_le_bytes()); // DRIVER_OK, skipping FEATURES_OK
    let mut b = [0u8; 4];
    t.read(0x70, &mut b);
    let status = u32::from_le_bytes(b);
    assert_eq!(status & 4, 0, "not running");
    assert_ne!(status & STATUS_NEEDS_RESET, 0);
}

fn save(d: &Driver, snapshot_dir: &std::path::Path, work_dir: &std::path::Path) -> SavedDevice {
    let ctx = SaveContext {
        snapshot_dir,
        work_dir,
        index: 0,
    };
    devices::bus::lock(d.transport.device()).save(&ctx).unwrap()
}

/// A snapshot freezes a writable disk where it is: the running device
/// carries on in a new layer, and a device restored from the snapshot
/// (over the same raw image, named again) sees the disk as it was, its
/// own writes in a layer of its own.
#[test]
fn a_saved_disk_is_frozen_and_restores_as_it_was() {
    let (dir, path, mut d) = setup(false);
    let (snap, work) = (dir.path().join("snap"), dir.path().join("work"));
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    d.write(DATA, &[0xaa; 512]);
    assert_eq!(request(&mut d, OUT, 3, 512, false).0, OK);
    let saved = save(&d, &snap, &work);
    assert_eq!(saved.kind, virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK);
    let external = saved.external.clone().expect("the raw image is named");
    assert_eq!(external.name, "disk.img");
    assert_eq!(external.size, DISK_SIZE);
    // After the snapshot the running disk writes elsewhere.
    d.write(DATA, &[0xbb; 512]);
    assert_eq!(request(&mut d, OUT, 3, 512, false).0, OK);
    let raw = std::fs::read(&path).unwrap();
    assert_ne!(
        &raw[3 * 512..4 * 512],
        &[0xbb; 512][..],
        "the raw image is frozen"
    );

    let base = HostFile::from(&path);
    let ctx = RestoreContext {
        snapshot_dir: &snap,
        work_dir: &work,
        index: 0,
        external: Some(&base),
        vsock_path: &dir.path().join("unused.sock"),
        flush: Default::default(),
    };
    let restored = Block::restore(&saved, &ctx).unwrap();
    let mut r = Driver::new(restored, 16);
    assert_eq!(request(&mut r, IN, 3, 512, true).0, OK);
    assert_eq!(r.read(DATA, 512), vec![0xaa; 512], "as at the snapshot");
    r.write(DATA, &[0xcc; 512]);
    assert_eq!(request(&mut r, OUT, 3, 512, false).0, OK);
    // Neither device sees the other's writes.
    assert_eq!(request(&mut d, IN, 3, 512, true).0, OK);
    assert_eq!(d.read(DATA, 512), vec![0xbb; 512]);

    // Named again over another file: refused with what was expected.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![0u8; 4096]).unwrap();
    let other = HostFile::from(&other);
    let e = Block::restore(
        &saved,
        &RestoreContext {
            external: Some(&other),
            ..ctx
        },
    )
    .err()
    .expect("another image is refused")
    .to_string();
    assert!(
        e.contains("is not the image the snapshot was taken with"),
        "{e}"
    );
}

/// Honour syncs the file for every flush (a sync that fails is the
/// guest's I/O error); writeback completes flushes without one. /dev/null
/// cannot be synced, which tells the two apart.
#[test]
fn the_flush_policy_decides_whether_a_flush_syncs() {
    use devices::virtio::block::FlushPolicy;
    let mut honour = Driver::new(Block::open("/dev/null", false).unwrap(), 16);
    assert_eq!(request(&mut honour, FLUSH, 0, 0, false).0, IOERR);
    let mut block = Block::open("/dev/null", false).unwrap();
    block.set_flush_policy(FlushPolicy::Writeback);
    let mut writeback = Driver::new(block, 16);
    assert_eq!(request(&mut writeback, FLUSH, 0, 0, false).0, OK);
}

/// A read lands in guest memory straight from a raw disk's file, and the
/// pages it wrote are marked dirty: a diff snapshot must carry them.
#[test]
fn a_read_marks_the_guest_pages_it_fills_dirty() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let (_dir, path, mut d) = setup(true);
    let region = d.mem.find_region(GuestAddress(DATA)).unwrap();
    let page = DATA - region.start_addr().0;
    (**region).bitmap().reset();
    assert!(!region.bitmap().dirty_at(page as usize));
    let (status, len) = request(&mut d, IN, 2, 8192, true);
    assert_eq!((status, len), (OK, 8193));
    assert_eq!(
        d.read(DATA, 8192),
        std::fs::read(&path).unwrap()[1024..1024 + 8192]
    );
    let region = d.mem.find_region(GuestAddress(DATA)).unwrap();
    assert!(region.bitmap().dirty_at(page as usize));
    assert!(region.bitmap().dirty_at(page as usize + 4096));
}
