//! Host tier: snapshot files are untrusted input. Every corrupt,
//! truncated, inconsistent, foreign or wrong-version snapshot must give a
//! clear error from `Vm::restore`: no panic, and nothing left behind (no
//! runtime directory, no thread).

use std::path::{Path, PathBuf};

use devices::legacy::SerialSnapshot;
use devices::virtio::persist::{ExternalFile, SavedDevice};
use vmm::cpu::state::VcpuState;
use vmm::persist::{
    DevicesState, SavedRegion, Snapshot, SnapshotInfo, VirtioSnapshot, VmState, MEMORY_FILE,
    STATE_FILE,
};
use vmm::{Error, RestoreOptions, Vm};

const MIB: u64 = 1 << 20;

fn zeroed_vcpu() -> VcpuState {
    VcpuState {
        cpuid: Vec::new(),
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        msrs: Vec::new(),
        events: Default::default(),
    }
}

/// A well-formed snapshot of a 1-vCPU, 32 MiB guest (its contents are not
/// a bootable machine: these tests never get that far).
fn sample(vendor: &str) -> Snapshot {
    Snapshot {
        info: SnapshotInfo {
            vmm_version: "test".into(),
            cpu_vendor: vendor.into(),
            cpus: 1,
            memory_mib: 32,
            regions: vec![SavedRegion {
                guest_addr: 0,
                size: 32 * MIB,
                file_offset: 0,
            }],
            annotation: Vec::new(),
            id: 1,
            parent: None,
        },
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![zeroed_vcpu()],
        devices: DevicesState {
            serial: SerialSnapshot {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            virtio: Vec::new(),
        },
        dirty: None,
    }
}

fn write_snapshot(dir: &Path, state: &[u8], memory_len: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(STATE_FILE), state).unwrap();
    let mem = std::fs::File::create(dir.join(MEMORY_FILE)).unwrap();
    mem.set_len(memory_len).unwrap();
}

/// Restores `dir` expecting failure; returns the error's text.
fn refused(dir: &Path) -> String {
    let runtime = dir.join("runtime");
    let options = RestoreOptions {
        runtime_dir: Some(runtime.clone()),
        ..Default::default()
    };
    match Vm::restore(dir, options) {
        Ok(_) => panic!("restoring a bad snapshot in {} succeeded", dir.display()),
        Err(e) => {
            // A bad snapshot is refused before any socket exists.
            let sockets = std::fs::read_dir(&runtime).map_or(0, |d| d.count());
            assert_eq!(sockets, 0, "restore left files in its runtime dir: {e}");
            e.to_string()
        }
    }
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn vendor() -> String {
    let kvm = kvm_ioctls::Kvm::new()
        .expect("these tests need /dev/kvm (any flavour, PVM included) to compare CPU vendors");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vmm::persist::cpu_vendor(&cpuid)
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("snap");
    (tmp, dir)
}

#[test]
fn truncated_state_files_are_refused_at_every_length() {
    let before = threads();
    let bytes = sample(&vendor()).to_bytes().unwrap();
    let (_tmp, dir) = scratch();
    for len in 0..bytes.len() {
        write_snapshot(&dir, &bytes[..len], 32 * MIB);
        let e = refused(&dir);
        assert!(
            e.contains("truncated")
                || e.contains("not a Capsule snapshot")
                || e.contains("section"),
            "truncated at {len}: {e}"
        );
    }
    assert_eq!(threads(), before, "a refused restore left a thread running");
}

#[test]
fn flipped_bytes_are_refused_everywhere() {
    let bytes = sample(&vendor()).to_bytes().unwrap();
    let (_tmp, dir) = scratch();
    // Every byte of the headers, and a spread through the payloads.
    let step = (bytes.len() / 2000).max(1);
    for at in (0..bytes.len()).filter(|i| *i < 64 || i % step == 0) {
        let mut bad = bytes.clone();
        bad[at] ^= 0x5a;
        write_snapshot(&dir, &bad, 32 * MIB);
        let e = refused(&dir);
        assert!(
            e.contains("corrupt")
                || e.contains("not a Capsule snapshot")
                || e.contains("version")
                || e.contains("truncated")
                || e.contains("sections"),
            "byte {at}: {e}"
        );
    }
}

#[test]
fn a_future_format_version_is_named() {
    let mut bytes = sample(&vendor()).to_bytes().unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..16]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    let (_tmp, dir) = scratch();
    write_snapshot(&dir, &bytes, 32 * MIB);
    let e = refused(&dir);
    assert!(e.contains("version 99 is not supported"), "{e}");
}

/// Two 16 MiB regions back to back in the file, the second at `second`.
fn two_regions(second: u64) -> Vec<SavedRegion> {
    vec![
        SavedRegion {
            guest_addr: 0,
            size: 16 * MIB,
            file_offset: 0,
        },
        SavedRegion {
            guest_addr: second,
            size: 16 * MIB,
            file_offset: 16 * MIB,
        },
    ]
}

/// A change that makes a sample snapshot inconsistent.
type Change = Box<dyn Fn(&mut Snapshot)>;

#[test]
fn inconsistent_contents_are_refused() {
    let (_tmp, dir) = scratch();
    let vendor = vendor();
    let cases: Vec<(&str, Change, &str)> = vec![
        ("no vCPUs", Box::new(|s| s.info.cpus = 0), "0 vCPUs"),
        (
            "a vCPU section missing",
            Box::new(|s| s.info.cpus = 2),
            "1 vCPU sections for 2 vCPUs",
        ),
        (
            "memory size disagrees with the regions",
            Box::new(|s| s.info.memory_mib = 64),
            "not 64 MiB",
        ),
        (
            "overlapping regions",
            Box::new(|s| {
                s.info.regions = two_regions(8 * MIB);
            }),
            "inconsistent",
        ),
        (
            "a layout this VMM never makes",
            Box::new(|s| {
                s.info.regions = two_regions(32 * MIB);
            }),
            "not this VMM's layout",
        ),
        (
            "an unaligned region",
            Box::new(|s| s.info.regions[0].guest_addr = 12),
            "inconsistent",
        ),
        (
            "a diff without its page map",
            Box::new(|s| s.info.parent = Some(7)),
            "needs both a parent and a dirty page map",
        ),
        (
            "a page map that does not fit",
            Box::new(|s| {
                s.info.parent = Some(7);
                s.dirty = Some(vec![vec![0; 3]]);
            }),
            "does not fit the memory regions",
        ),
        (
            "a device of a kind this VMM does not have",
            Box::new(|s| s.devices.virtio = vec![device(99, Vec::new(), None)]),
            "unknown device kind 99",
        ),
        (
            "a disk whose state is garbage",
            Box::new(|s| s.devices.virtio = vec![device(2, vec![0xff; 9], None)]),
            "the disk state is malformed",
        ),
        (
            "an rng with state",
            Box::new(|s| s.devices.virtio = vec![device(4, vec![1], None)]),
            "the rng has no state",
        ),
        (
            "an external file name that is a whole essay",
            Box::new(|s| {
                let external = ExternalFile {
                    name: "x".repeat(300),
                    size: 0,
                    mtime_ns: 0,
                };
                s.devices.virtio = vec![device(2, Vec::new(), Some(external))];
            }),
            "an external file's name is too long",
        ),
        (
            "too many devices",
            Box::new(|s| s.devices.virtio = vec![device(4, Vec::new(), None); 40]),
            "too many devices",
        ),
        (
            "an annotation of more than 64 KiB",
            Box::new(|s| s.info.annotation = vec![b'x'; (64 << 10) + 1]),
            "annotation is too long",
        ),
        (
            "a region that wraps around",
            Box::new(|s| s.info.regions[0].guest_addr = u64::MAX - 4095),
            "wraps around",
        ),
    ];
    for (what, change, expected) in cases {
        let mut snap = sample(&vendor);
        change(&mut snap);
        write_snapshot(&dir, &snap.to_bytes().unwrap(), 32 * MIB);
        let e = refused(&dir);
        assert!(e.contains(expected), "{what}: {e}");
    }
}

#[test]
fn a_section_with_garbage_inside_a_valid_checksum_is_refused() {
    let mut w = snapshot::container::StateWriter::new();
    w.section(*b"INFO", vec![0xff; 40]);
    let (_tmp, dir) = scratch();
    write_snapshot(&dir, &w.to_bytes(), 32 * MIB);
    let e = refused(&dir);
    assert!(e.contains("info section is malformed"), "{e}");

    let mut w = snapshot::container::StateWriter::new();
    w.section(*b"WHAT", Vec::new());
    write_snapshot(&dir, &w.to_bytes(), 32 * MIB);
    assert!(refused(&dir).contains("unexpected section"));
}

#[test]
fn a_short_or_missing_memory_file_is_refused() {
    let bytes = sample(&vendor()).to_bytes().unwrap();
    let (_tmp, dir) = scratch();
    write_snapshot(&dir, &bytes, 32 * MIB - 4096);
    let e = refused(&dir);
    assert!(e.contains("bytes where the guest has"), "{e}");
    std::fs::remove_file(dir.join(MEMORY_FILE)).unwrap();
    let e = refused(&dir);
    assert!(e.contains("cannot read snapshot memory"), "{e}");
    std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
    let e = refused(&dir);
    assert!(e.contains("cannot read snapshot state"), "{e}");
}

#[test]
fn a_snapshot_from_another_cpu_vendor_is_refused() {
    let before = threads();
    let bytes = sample("OtherVendor!").to_bytes().unwrap();
    let (_tmp, dir) = scratch();
    write_snapshot(&dir, &bytes, 32 * MIB);
    let e = refused(&dir);
    assert!(
        e.contains("cannot be restored on this host") && e.contains("OtherVendor!"),
        "{e}"
    );
    assert!(matches!(
        Vm::restore(&dir, RestoreOptions::default()),
        Err(Error::SnapshotIncompatible(_))
    ));
    assert_eq!(threads(), before);
}

#[test]
fn features_the_host_lacks_are_named() {
    let mut snap = sample(&vendor());
    // Leaf 7 EBX bit 31 (AVX-512VL) plus every other bit: no host has
    // all of them.
    snap.vcpus[0].cpuid.push(kvm_bindings::kvm_cpuid_entry2 {
        function: 7,
        index: 0,
        flags: 1,
        ebx: u32::MAX,
        ..Default::default()
    });
    let (_tmp, dir) = scratch();
    write_snapshot(&dir, &snap.to_bytes().unwrap(), 32 * MIB);
    let e = refused(&dir);
    assert!(
        e.contains("CPU features this host lacks") && e.contains("CPUID 0x7.0 ebx"),
        "{e}"
    );
}

fn dirty_map() -> Vec<Vec<u64>> {
    vec![vec![0; (32 * MIB / 4096).div_ceil(64) as usize]]
}

#[test]
fn a_diff_whose_parent_is_missing_replaced_or_a_link_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let child_dir = tmp.path().join("child");
    let mut child = sample(&vendor());
    child.info.id = 2;
    child.info.parent = Some(99);
    child.dirty = Some(dirty_map());
    write_snapshot(&child_dir, &child.to_bytes().unwrap(), 32 * MIB);
    let e = refused(&child_dir);
    assert!(e.contains("parent"), "no parent/: {e}");

    // The snapshot in parent/ is not the one (id 1, not 99).
    let parent = sample(&vendor());
    write_snapshot(
        &child_dir.join("parent"),
        &parent.to_bytes().unwrap(),
        32 * MIB,
    );
    let e = refused(&child_dir);
    assert!(
        e.contains("is not the snapshot it was taken against"),
        "{e}"
    );

    // parent/ as a link to a snapshot elsewhere: not followed.
    std::fs::remove_dir_all(child_dir.join("parent")).unwrap();
    let elsewhere = tmp.path().join("elsewhere");
    let mut other = sample(&vendor());
    other.info.id = 99;
    write_snapshot(&elsewhere, &other.to_bytes().unwrap(), 32 * MIB);
    std::os::unix::fs::symlink(&elsewhere, child_dir.join("parent")).unwrap();
    let e = refused(&child_dir);
    assert!(e.contains("is not a directory"), "{e}");

    // A diff that is its own parent, again and again, ends in an error.
    std::fs::remove_file(child_dir.join("parent")).unwrap();
    let mut looped = sample(&vendor());
    looped.info.id = 2;
    looped.info.parent = Some(2);
    looped.dirty = Some(dirty_map());
    let mut at = child_dir.clone();
    for _ in 0..70 {
        write_snapshot(&at, &looped.to_bytes().unwrap(), 32 * MIB);
        at = at.join("parent");
    }
    let e = refused(&child_dir);
    assert!(e.contains("diff snapshots deep"), "{e}");
}

/// A device of virtio kind `kind` with `state`, not started by a driver.
fn device(kind: u32, state: Vec<u8>, external: Option<ExternalFile>) -> VirtioSnapshot {
    VirtioSnapshot {
        transport: Default::default(),
        device: SavedDevice {
            kind,
            state,
            external,
        },
    }
}

/// A disk whose raw image is `base` (64 KiB of ones) and whose layers
/// are `layers`, as a snapshot with one read-only disk records it.
fn with_disk(snap: &mut Snapshot, base: &Path, layers: Vec<String>) {
    let (size, mtime_ns) = devices::disk::fingerprint(base).unwrap();
    let state = devices::virtio::block::BlockState {
        read_only: true,
        capacity_sectors: size / 512,
        layers,
    };
    let external = ExternalFile {
        name: "base.img".into(),
        size,
        mtime_ns,
    };
    let state = devices::virtio::persist::encode("disk", &state).unwrap();
    snap.devices.virtio = vec![device(2, state, Some(external))];
}

fn refused_with(dir: &Path, disks: Vec<PathBuf>) -> String {
    let runtime = dir.join("runtime");
    let options = RestoreOptions {
        runtime_dir: Some(runtime.clone()),
        disks: disks.into_iter().map(Into::into).collect(),
        ..Default::default()
    };
    match Vm::restore(dir, options) {
        Ok(_) => panic!(
            "restoring a crafted snapshot in {} succeeded",
            dir.display()
        ),
        Err(e) => {
            let left = std::fs::read_dir(&runtime).map_or(0, |d| d.count());
            assert_eq!(left, 0, "restore left files in its runtime dir: {e}");
            e.to_string()
        }
    }
}

/// Snapshots are data: one crafted to name host files (with valid
/// checksums, as an attacker recomputes them) gets nothing opened.
#[test]
fn a_crafted_snapshot_cannot_name_files_outside_itself() {
    let (tmp, dir) = scratch();
    let base = tmp.path().join("base.img");
    std::fs::write(&base, vec![1u8; 64 << 10]).unwrap();
    for name in [
        "/etc/shadow",
        "../base.img",
        "disk0.0.layer/../../x",
        "state",
        "",
    ] {
        let mut snap = sample(&vendor());
        with_disk(&mut snap, &base, vec![name.to_string()]);
        write_snapshot(&dir, &snap.to_bytes().unwrap(), 32 * MIB);
        let e = refused_with(&dir, vec![base.clone()]);
        assert!(
            e.contains("names only its own layer files"),
            "{name:?}: {e}"
        );
    }

    // The right name, but the file is a link to a host file.
    let mut snap = sample(&vendor());
    with_disk(&mut snap, &base, vec!["disk0.0.layer".into()]);
    write_snapshot(&dir, &snap.to_bytes().unwrap(), 32 * MIB);
    std::os::unix::fs::symlink("/etc/passwd", dir.join("disk0.0.layer")).unwrap();
    let e = refused_with(&dir, vec![base.clone()]);
    assert!(
        e.contains("disk 0") && e.contains("opening its layers"),
        "{e}"
    );
    std::fs::remove_file(dir.join("disk0.0.layer")).unwrap();

    // A real layer, but made over another image: a base outside its chain.
    let other = tmp.path().join("other.img");
    std::fs::write(&other, vec![2u8; 64 << 10]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&other)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1))
        .unwrap();
    let mut over_other = devices::disk::DiskImage::open_raw(&other, false).unwrap();
    over_other.push_layer(&dir.join("disk0.0.layer")).unwrap();
    drop(over_other);
    let e = refused_with(&dir, vec![base.clone()]);
    assert!(e.contains("not the image it was made over"), "{e}");
}

#[test]
fn disks_are_named_again_and_must_be_the_ones_snapshotted() {
    let (tmp, dir) = scratch();
    let base = tmp.path().join("base.img");
    std::fs::write(&base, vec![1u8; 64 << 10]).unwrap();
    let mut snap = sample(&vendor());
    with_disk(&mut snap, &base, Vec::new());
    write_snapshot(&dir, &snap.to_bytes().unwrap(), 32 * MIB);

    // None named: the error lists what is needed.
    let e = refused_with(&dir, Vec::new());
    assert!(
        e.contains("1 disk(s) and 0 were named") && e.contains("disk 0: \"base.img\", 65536 bytes"),
        "{e}"
    );
    assert!(matches!(
        Vm::restore(&dir, RestoreOptions::default()),
        Err(Error::DisksNotNamed {
            expected: 1,
            given: 0,
            ..
        })
    ));

    // Another file of the same size, or the same file changed.
    let impostor = tmp.path().join("impostor.img");
    std::fs::write(&impostor, vec![9u8; 32 << 10]).unwrap();
    let e = refused_with(&dir, vec![impostor]);
    assert!(
        e.contains("is not the image the snapshot was taken with"),
        "{e}"
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&base, vec![3u8; 64 << 10]).unwrap();
    let e = refused_with(&dir, vec![base]);
    assert!(
        e.contains("is not the image the snapshot was taken with"),
        "{e}"
    );
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_mapped() {
    let (_tmp, dir) = scratch();
    let mut snap = sample(&vendor());
    let huge = 1u64 << 30; // MiB: 1 PiB
    snap.info.memory_mib = huge;
    snap.info.regions = vec![SavedRegion {
        guest_addr: 0,
        size: huge << 20,
        file_offset: 0,
    }];
    write_snapshot(&dir, &snap.to_bytes().unwrap(), 32 * MIB);
    let e = refused(&dir);
    assert!(e.contains("more than the"), "{e}");
}
