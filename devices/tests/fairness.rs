//! A guest that keeps a device busy cannot keep it from anything else:
//! one wake-up serves a bounded batch, a queue that would feed itself is
//! refused, and a device can always be reset and started again.

mod common;

use std::time::{Duration, Instant};

use common::*;
use devices::virtio::block::Block;
use vm_memory::{Bytes, GuestAddress};

const IN: u32 = 0;
const OK: u8 = 0;
const IOERR: u8 = 1;
const SECTOR: u64 = 512;

fn disk(sectors: u64, fill: impl Fn(u64) -> Vec<u8>) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut data = Vec::with_capacity((sectors * SECTOR) as usize);
    for s in 0..sectors {
        let mut sector = fill(s);
        sector.resize(SECTOR as usize, 0);
        data.extend_from_slice(&sector);
    }
    std::fs::write(&path, data).unwrap();
    (dir, path)
}

fn header_bytes(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

/// The hostile layout from the hardening issue: a read whose data lands
/// on the queue's own avail ring and on the request's header, with disk
/// contents that make each read publish the next one (sector k sets the
/// avail index to k + 2 and the header to sector k + 1). On a device
/// without the ring check this loops through the whole disk in one wake,
/// never looking at a stop request, with the guest idle.
#[test]
fn a_queue_that_would_feed_itself_is_refused_at_once() {
    const SIZE: u16 = 16;
    const SECTORS: u64 = 32 * 1024;
    let avail_of_layout = RINGS_BASE + 0x1_0000;
    let header_at = avail_of_layout + 64;
    let (_dir, path) = disk(SECTORS, |k| {
        let mut s = vec![0u8; 64];
        s[2..4].copy_from_slice(&(((k + 2) & 0xffff) as u16).to_le_bytes());
        s.extend_from_slice(&header_bytes(IN, k + 1));
        s
    });
    let mut d = Driver::new(Block::open(&path, false).unwrap(), SIZE);
    let avail = d.queues[0].avail;
    assert_eq!(avail, avail_of_layout);
    let status_at = 0x30_0000;
    d.write(header_at, &header_bytes(IN, 0));
    d.write(status_at, &[0xff]);
    d.write_chain(
        0,
        0,
        &[
            (header_at, 16, false),
            (avail, SECTOR as u32, true),
            (status_at, 1, true),
        ],
    );
    let mut em = d.take_event_loop();
    // The device thread: the VMM's loop, stop flag and all.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpu_used = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let start = thread_cpu();
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                em.run_with_timeout(10).unwrap();
            }
            thread_cpu() - start
        })
    };
    // Publish head 0 and kick, as a driver would.
    d.mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    d.mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    let ring_before = d.read(avail, 80);
    d.transport.queue_events()[0].write(1).unwrap();
    let watched = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let stopped = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Release);
    let cpu = cpu_used.join().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_millis(500),
        "the device thread took {:?} to stop",
        stopped.elapsed()
    );
    let share = cpu.as_secs_f64() / watched.elapsed().as_secs_f64();
    assert!(
        share < 0.2,
        "the device thread used {:.0}% of a core",
        share * 100.0
    );
    assert_ne!(
        d.status() & STATUS_NEEDS_RESET,
        0,
        "the device stopped itself"
    );
    assert_eq!(
        d.read(avail, 80),
        ring_before,
        "nothing was written over the ring or the header"
    );
    assert_eq!(d.used_idx(0), 0, "no request was served");
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Queues `n` reads of one sector each (descriptors 3i..3i+2), without
/// kicking.
fn queue_reads(d: &mut Driver, n: u16) {
    for i in 0..n {
        let base = 0x40_0000 + u64::from(i) * 0x1000;
        d.write(base, &header_bytes(IN, u64::from(i)));
        d.write_chain(
            0,
            i * 3,
            &[
                (base, 16, false),
                (base + 0x100, 512, true),
                (base + 0x800, 1, true),
            ],
        );
        let layout = &mut d.queues[0];
        let slot = u64::from(layout.next_avail % layout.size);
        let avail = layout.avail;
        layout.next_avail = layout.next_avail.wrapping_add(1);
        d.mem
            .write_obj(i * 3, GuestAddress(avail + 4 + slot * 2))
            .unwrap();
    }
    let idx = d.queues[0].next_avail;
    d.mem
        .write_obj(idx, GuestAddress(d.queues[0].avail + 2))
        .unwrap();
}

#[test]
fn one_wake_serves_a_bounded_batch_and_the_device_comes_back_for_the_rest() {
    let (_dir, path) = disk(256, |k| vec![k as u8; 512]);
    let mut d = Driver::new(Block::open(&path, false).unwrap(), 256);
    queue_reads(&mut d, 80);
    d.transport.queue_events()[0].write(1).unwrap();
    d.run_once();
    let after_one = d.used_idx(0);
    assert_eq!(after_one, 64, "one wake-up serves at most 64 requests");
    d.run();
    assert_eq!(d.used_idx(0), 80, "the device came back for the rest");
    for i in 0..80u64 {
        let base = 0x40_0000 + i * 0x1000;
        assert_eq!(d.read(base + 0x800, 1)[0], OK);
        assert_eq!(d.read(base + 0x100, 512), vec![i as u8; 512]);
    }
}

#[test]
fn a_huge_request_is_refused_whole() {
    let (_dir, path) = disk(64, |_| vec![7; 512]);
    let mut d = Driver::new(Block::open(&path, false).unwrap(), 256);
    // 250 descriptors of 1 MiB over the same memory: 250 MiB asked for.
    let hdr = 0x30_0000;
    let data = 0x40_0000;
    let status = 0x3f_0000;
    d.write(hdr, &header_bytes(IN, 0));
    d.write(status, &[0xff]);
    let mut bufs = vec![(hdr, 16, false)];
    bufs.extend(std::iter::repeat_n((data, 1 << 20, true), 250));
    bufs.push((status, 1, true));
    d.write_chain(0, 0, &bufs);
    d.write(data, &[0xaa; 16]);
    d.submit(0, 0);
    assert_eq!(d.used_idx(0), 1);
    assert_eq!(d.read(status, 1)[0], IOERR);
    assert_eq!(d.read(data, 16), vec![0xaa; 16], "nothing was read");
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0, "the device carries on");
}

#[test]
fn rings_that_overlap_are_refused() {
    let (_dir, path) = disk(64, |_| vec![1; 512]);
    // One queue whose used ring is its own avail ring: every completion
    // would make the next request.
    let mut d = Driver::new(Block::open(&path, false).unwrap(), 16);
    d.reset();
    d.write_reg(0x70, 1);
    d.write_reg(0x70, 3);
    for sel in 0..2u32 {
        d.write_reg(0x14, sel);
        let offered = d.read_reg(0x10);
        d.write_reg(0x24, sel);
        d.write_reg(0x20, offered);
    }
    d.write_reg(0x70, 11);
    d.write_reg(0x30, 0);
    d.write_reg(0x38, 16);
    for (reg, addr) in [(0x80, 0x20_0000u32), (0x90, 0x21_0000), (0xa0, 0x21_0000)] {
        d.write_reg(reg, addr);
        d.write_reg(reg + 4, 0);
    }
    d.write_reg(0x44, 1);
    d.write_reg(0x70, 15);
    d.run();
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0, "refused");

    // Two devices of one VM with rings in the same place.
    let (_dir2, path2) = disk(64, |_| vec![2; 512]);
    let mut first = Driver::new(Block::open(&path, false).unwrap(), 16);
    let mut second = first.sibling(
        Block::open(&path2, false).unwrap(),
        16,
        RINGS_BASE + 0x1_0000,
    );
    assert_ne!(
        second.status() & STATUS_NEEDS_RESET,
        0,
        "overlaps the first"
    );
    second.reset();
    second.set_up(16, RINGS_BASE + 0x80_0000);
    assert_eq!(
        second.status() & STATUS_NEEDS_RESET,
        0,
        "elsewhere it starts"
    );
    // Once the first is reset, its place is free.
    first.reset();
    second.reset();
    second.set_up(16, RINGS_BASE);
    assert_eq!(second.status() & STATUS_NEEDS_RESET, 0);
}

fn read_sector(d: &mut Driver, sector: u64) -> (u8, Vec<u8>) {
    let base = 0x60_0000;
    d.write(base, &header_bytes(IN, sector));
    d.write(base + 0x800, &[0xff]);
    d.write_chain(
        0,
        0,
        &[
            (base, 16, false),
            (base + 0x100, 512, true),
            (base + 0x800, 1, true),
        ],
    );
    let before = d.used_idx(0);
    d.submit(0, 0);
    assert_eq!(d.used_idx(0), before.wrapping_add(1), "served");
    (d.read(base + 0x800, 1)[0], d.read(base + 0x100, 512))
}

#[test]
fn an_activated_device_can_be_reset_and_driven_again() {
    let (_dir, path) = disk(64, |k| vec![k as u8 + 1; 512]);
    let mut d = Driver::new(Block::open(&path, false).unwrap(), 16);
    assert_eq!(read_sector(&mut d, 3), (OK, vec![4; 512]));
    d.reset();
    assert_eq!(d.status(), 0);
    // A kick of the old queue goes nowhere now.
    d.transport.queue_events()[0].write(1).unwrap();
    d.run();
    // Set up again elsewhere, as a driver that rebinds would.
    d.set_up(16, RINGS_BASE + 0x80_0000);
    assert_eq!(d.status() & STATUS_NEEDS_RESET, 0);
    assert_eq!(read_sector(&mut d, 5), (OK, vec![6; 512]));
    // And a device that failed can be reset and started again too.
    d.set_avail_idx(0, 1000);
    d.kick(0);
    assert_ne!(d.status() & STATUS_NEEDS_RESET, 0);
    d.reset();
    d.set_up(16, RINGS_BASE);
    assert_eq!(read_sector(&mut d, 7), (OK, vec![8; 512]));
}
