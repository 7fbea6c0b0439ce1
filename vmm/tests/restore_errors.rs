//! Host tier: snapshot files are untrusted input. Every corrupt,
//! truncated, inconsistent, foreign or wrong-version snapshot must give a
//! clear error from `Vm::restore`: no panic, and nothing left behind (no
//! runtime directory, no thread).

use std::path::{Path, PathBuf};

use devices::legacy::SerialSnapshot;
use vmm::cpu::state::VcpuState;
use vmm::persist::{
    DevicesState, SavedRegion, Snapshot, SnapshotInfo, VmState, MEMORY_FILE, STATE_FILE,
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
            hostname: "sample".into(),
            disks: Vec::new(),
            root_on_disk: false,
            agent_ready: true,
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
            Box::new(|s| s.info.parent = Some(("/elsewhere".into(), 7))),
            "needs both a parent and a dirty page map",
        ),
        (
            "a page map that does not fit",
            Box::new(|s| {
                s.info.parent = Some(("/elsewhere".into(), 7));
                s.dirty = Some(vec![vec![0; 3]]);
            }),
            "does not fit the memory regions",
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

#[test]
fn a_diff_whose_parent_was_replaced_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (parent_dir, child_dir) = (tmp.path().join("parent"), tmp.path().join("child"));
    let parent = sample(&vendor());
    write_snapshot(&parent_dir, &parent.to_bytes().unwrap(), 32 * MIB);
    let mut child = sample(&vendor());
    child.info.id = 2;
    // Taken against a snapshot with id 99: not what is there now.
    child.info.parent = Some((parent_dir.clone(), 99));
    child.dirty = Some(vec![vec![0; (32 * MIB / 4096).div_ceil(64) as usize]]);
    write_snapshot(&child_dir, &child.to_bytes().unwrap(), 32 * MIB);
    let e = refused(&child_dir);
    assert!(
        e.contains("no longer the snapshot it was taken against"),
        "{e}"
    );
    // A diff that is its own parent is a loop, not a hang.
    child.info.parent = Some((child_dir.clone(), 2));
    std::fs::remove_dir_all(&child_dir).unwrap();
    write_snapshot(&child_dir, &child.to_bytes().unwrap(), 32 * MIB);
    let e = refused(&child_dir);
    assert!(e.contains("diff snapshots deep"), "{e}");
}
