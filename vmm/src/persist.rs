//! What a snapshot directory holds and how it is written and read back.
//!
//! ```text
//! <dir>/state              the state file: snapshot::container sections
//!                          INFO (SnapshotInfo), VMST (VmState), VCPU x N, DEVS
//! <dir>/memory             guest RAM, regions back to back, zero pages as holes
//! <dir>/disk<i>.<j>.layer  disk i's copy-on-write layers, bottom first
//! <dir>/parent/            for a diff: the snapshot it is a diff against
//!                          (its state and memory, and its own parent/)
//! <dir>/workingset         optional: memory a restored guest touched first
//! ```
//!
//! A snapshot is data, not instructions: it names no file outside its
//! directory and no path at all. Its own files are found by fixed names
//! (layer names are checked to be exactly what this VMM writes), a diff's
//! parent is the `parent` directory inside it (hard links, so a diff is
//! whole on its own and can be moved), and the raw disk images under its
//! layers, which live outside, are named again by whoever restores it and
//! checked against the size and modification time recorded here.
//!
//! Section payloads are postcard-encoded structs. Everything read back is
//! checked before a VM is created from it: a corrupt, truncated, foreign
//! or crafted snapshot is an error naming the problem, never a panic and
//! never a half-started VM.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use devices::legacy::SerialSnapshot;
use devices::virtio::mmio::MmioState;
use devices::virtio::DeviceState;
use kvm_bindings::{kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_pit_state2, CpuId};
use serde::{Deserialize, Serialize};
use snapshot::container::{self, StateWriter, Tag};

use crate::cpu::state::VcpuState;
use crate::error::{Error, Result};
use crate::layout::MAX_VCPUS;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// A state file is a few hundred KiB at most (vCPU and device state);
/// anything far bigger is not ours.
const MAX_STATE_FILE: u64 = 64 << 20;

const TAG_INFO: Tag = *b"INFO";
const TAG_VM: Tag = *b"VMST";
const TAG_VCPU: Tag = *b"VCPU";
const TAG_DEVICES: Tag = *b"DEVS";
const TAG_DIRTY: Tag = *b"DIRT";
/// Longest chain of diff snapshots a restore follows.
pub const MAX_DIFF_CHAIN: usize = 64;

/// What the snapshot is of, and what restoring it needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The `vmm` crate version that wrote it (informational).
    pub vmm_version: String,
    /// CPUID vendor of the host that took it ("GenuineIntel",
    /// "AuthenticAMD"): vCPU state does not move between vendors.
    pub cpu_vendor: String,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Where each RAM region lives in the memory file.
    pub regions: Vec<SavedRegion>,
    pub hostname: String,
    pub disks: Vec<SavedDisk>,
    pub root_on_disk: bool,
    /// Whether the guest agent had announced itself: a restored VM can be
    /// talked to at once only if it had.
    pub agent_ready: bool,
    /// Random, unique to this snapshot: what a diff names its parent by.
    pub id: u64,
    /// For a diff snapshot: the id of the snapshot its memory file is a
    /// diff against (itself full or a diff), kept in `parent/`.
    pub parent: Option<u64>,
}

/// Where a diff snapshot keeps the snapshot it is a diff against.
pub const PARENT_DIR: &str = "parent";

/// The most memory a snapshot may claim: anything larger is refused
/// before a byte is mapped.
pub const MAX_MEMORY_MIB: u64 = crate::layout::MAX_MEMORY_MIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// One disk of the snapshot: a raw image outside it and the layers over
/// that image, kept inside it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// The raw image at the bottom, as it was when the snapshot was taken.
    pub base: ExternalImage,
    /// Layer files in the snapshot directory, bottom first, by name
    /// (`disk<i>.<j>.layer`, see [`devices::virtio::block::layer_name`]).
    pub layers: Vec<String>,
    pub read_only: bool,
}

/// A file outside the snapshot: named again at restore, and checked to be
/// unchanged (its size and modification time, as
/// [`devices::disk::fingerprint`] gives them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalImage {
    /// Its file name then: for messages only, never opened.
    pub name: String,
    pub size: u64,
    pub mtime_ns: u64,
}

/// The VM-wide KVM state: the in-kernel interrupt controllers, the PIT
/// and the kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Every device, in the order they sit on the buses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialSnapshot,
    pub virtio: Vec<VirtioSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    pub transport: MmioState,
    pub device: DeviceState,
}

/// A whole snapshot, in memory (the guest RAM stays in its file).
#[derive(Debug)]
pub struct Snapshot {
    pub info: SnapshotInfo,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
    /// For a diff snapshot: which pages its memory file holds, one bitmap
    /// per region (see `snapshot::memory::write_diff`).
    pub dirty: Option<Vec<Vec<u64>>>,
}

fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Snapshot(format!("encoding {what}: {e}")))
}

fn decode<'a, T: Deserialize<'a>>(path: &Path, what: &str, bytes: &'a [u8]) -> Result<T> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| {
        Error::Snapshot(format!(
            "{}: the {what} section is malformed: {e}",
            path.display()
        ))
    })?;
    if !rest.is_empty() {
        return Err(Error::Snapshot(format!(
            "{}: the {what} section has {} stray bytes",
            path.display(),
            rest.len()
        )));
    }
    Ok(value)
}

impl Snapshot {
    /// The state file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut w = StateWriter::new();
        w.section(TAG_INFO, encode("info", &self.info)?);
        w.section(TAG_VM, encode("VM state", &self.vm)?);
        for vcpu in &self.vcpus {
            w.section(TAG_VCPU, encode("vCPU state", vcpu)?);
        }
        w.section(TAG_DEVICES, encode("device state", &self.devices)?);
        if let Some(dirty) = &self.dirty {
            w.section(TAG_DIRTY, encode("dirty page map", dirty)?);
        }
        Ok(w.to_bytes())
    }

    /// Parses and checks a state file read from `path`.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Snapshot> {
        let sections = container::parse(bytes).map_err(|source| Error::SnapshotFormat {
            path: path.to_path_buf(),
            source,
        })?;
        let mut info = None;
        let mut vm = None;
        let mut devices = None;
        let mut dirty = None;
        let mut vcpus = Vec::new();
        for section in &sections {
            match section.tag {
                TAG_INFO if info.is_none() => info = Some(decode(path, "info", section.payload)?),
                TAG_VM if vm.is_none() => vm = Some(decode(path, "VM state", section.payload)?),
                TAG_DEVICES if devices.is_none() => {
                    devices = Some(decode(path, "device state", section.payload)?)
                }
                TAG_DIRTY if dirty.is_none() => {
                    dirty = Some(decode(path, "dirty page map", section.payload)?)
                }
                TAG_VCPU if vcpus.len() < usize::from(MAX_VCPUS) => {
                    vcpus.push(decode(path, "vCPU state", section.payload)?)
                }
                tag => {
                    return Err(Error::Snapshot(format!(
                        "{}: unexpected section {:?}",
                        path.display(),
                        String::from_utf8_lossy(&tag)
                    )))
                }
            }
        }
        let missing = |what: &str| {
            Error::Snapshot(format!("{}: the {what} section is missing", path.display()))
        };
        let snapshot = Snapshot {
            info: info.ok_or_else(|| missing("info"))?,
            vm: vm.ok_or_else(|| missing("VM state"))?,
            vcpus,
            devices: devices.ok_or_else(|| missing("device state"))?,
            dirty,
        };
        snapshot.check(path)?;
        Ok(snapshot)
    }

    /// Consistency checks that do not need the host: counts and memory
    /// layout.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Error::Snapshot(format!("{}: {what}", path.display()));
        let info = &self.info;
        if info.cpus == 0 || info.cpus > MAX_VCPUS {
            return Err(bad(format!("{} vCPUs", info.cpus)));
        }
        if self.vcpus.len() != usize::from(info.cpus) {
            return Err(bad(format!(
                "{} vCPU sections for {} vCPUs",
                self.vcpus.len(),
                info.cpus
            )));
        }
        // Regions: in address order, not overlapping, back to back in the
        // file from offset 0, page-aligned, summing to the memory size.
        let mut next_offset = 0u64;
        let mut next_addr = 0u64;
        for r in &info.regions {
            let aligned = r.guest_addr % 4096 == 0 && r.size % 4096 == 0 && r.size > 0;
            if !aligned || r.guest_addr < next_addr || r.file_offset != next_offset {
                return Err(bad(format!("memory region {r:?} is inconsistent")));
            }
            next_addr = r
                .guest_addr
                .checked_add(r.size)
                .ok_or_else(|| bad(format!("memory region {r:?} wraps around")))?;
            next_offset += r.size;
        }
        if info.memory_mib > MAX_MEMORY_MIB {
            return Err(bad(format!(
                "{} MiB of memory, more than the {MAX_MEMORY_MIB} MiB this VMM gives a guest",
                info.memory_mib
            )));
        }
        if info.memory_mib.checked_shl(20) != Some(next_offset) || next_offset == 0 {
            return Err(bad(format!(
                "memory regions hold {next_offset} bytes, not {} MiB",
                info.memory_mib
            )));
        }
        // Exactly the RAM layout this VMM gives that much memory: memory
        // is mapped (and served) region by region as the file says.
        let expected: Vec<(u64, u64)> = crate::memory::ram_ranges(next_offset)
            .into_iter()
            .map(|(addr, len)| (addr.0, len as u64))
            .collect();
        let found: Vec<(u64, u64)> = info
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if expected != found {
            return Err(bad(format!(
                "memory regions {found:x?} are not this VMM's layout for {} MiB",
                info.memory_mib
            )));
        }
        match (&info.parent, &self.dirty) {
            (None, None) => {}
            (Some(_), Some(dirty)) => {
                let fits = dirty.len() == info.regions.len()
                    && dirty
                        .iter()
                        .zip(&info.regions)
                        .all(|(d, r)| d.len() as u64 == (r.size / 4096).div_ceil(64));
                if !fits {
                    return Err(bad(
                        "the dirty page map does not fit the memory regions".into()
                    ));
                }
            }
            _ => {
                return Err(bad(
                    "a diff snapshot needs both a parent and a dirty page map".into(),
                ))
            }
        }
        if info.disks.len() > 16 || self.devices.virtio.len() > 32 {
            return Err(bad("too many devices".into()));
        }
        if self.block_states().count() != info.disks.len() {
            return Err(bad(format!(
                "{} disks but {} disk devices",
                info.disks.len(),
                self.block_states().count()
            )));
        }
        for (i, (disk, state)) in info.disks.iter().zip(self.block_states()).enumerate() {
            if disk.read_only != state.read_only {
                return Err(bad(format!(
                    "disk {i} and its device disagree on being read-only"
                )));
            }
            if disk.layers.len() > devices::disk::MAX_DEPTH {
                return Err(bad(format!("disk {i} has {} layers", disk.layers.len())));
            }
            for (j, name) in disk.layers.iter().enumerate() {
                // Only the names this VMM writes: never a path, never
                // another file of the directory.
                if *name != devices::virtio::block::layer_name(i, j) {
                    return Err(bad(format!(
                        "disk {i} names {name:?} as a layer: a snapshot names only its own \
                         layer files (disk{i}.{j}.layer)"
                    )));
                }
            }
            if disk.base.name.len() > 255 {
                return Err(bad(format!("disk {i}'s base name is too long")));
            }
        }
        if !crate::vm::valid_hostname(&info.hostname) {
            return Err(bad(format!("invalid hostname {:?}", info.hostname)));
        }
        Ok(())
    }

    /// The block devices' states, in the order of `info.disks`.
    pub fn block_states(&self) -> impl Iterator<Item = &devices::virtio::block::BlockState> {
        self.devices.virtio.iter().filter_map(|v| match &v.device {
            DeviceState::Block(state) => Some(state),
            _ => None,
        })
    }

    /// Whether this host can run the snapshot's vCPUs: same CPU vendor,
    /// and every CPU feature the guest was shown is one this host's KVM
    /// supports.
    pub fn check_host(&self, vendor: &str, supported: &CpuId) -> Result<()> {
        if self.info.cpu_vendor != vendor {
            return Err(Error::SnapshotIncompatible(format!(
                "it was taken on a {} CPU and this host is {vendor}",
                self.info.cpu_vendor
            )));
        }
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            missing_features(&vcpu.cpuid, supported.as_slice()).map_err(|m| {
                Error::SnapshotIncompatible(format!(
                    "vCPU {i} uses CPU features this host lacks ({m})"
                ))
            })?;
        }
        Ok(())
    }
}

/// Feature leaves compared between a snapshot's guest CPUID and a host's
/// supported CPUID: (leaf, subleaf, register, bits that may differ).
/// Bits that mirror guest-controlled state (OSXSAVE, OSPKE) or that the
/// VMM sets itself (the hypervisor bit) are left out.
const FEATURE_WORDS: [(u32, u32, usize, u32); 7] = [
    (1, 0, ECX, (1 << 27) | (1 << 31)),
    (1, 0, EDX, 0),
    (7, 0, EBX, 0),
    (7, 0, ECX, 1 << 4),
    (7, 0, EDX, 0),
    (0x8000_0001, 0, ECX, 0),
    (0x8000_0001, 0, EDX, 0),
];
const EBX: usize = 1;
const ECX: usize = 2;
const EDX: usize = 3;

fn missing_features(
    guest: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> std::result::Result<(), String> {
    let find = |entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32| {
        entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || e.flags & 1 == 0))
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    };
    for (leaf, sub, reg, ignore) in FEATURE_WORDS {
        let Some(g) = find(guest, leaf, sub) else {
            continue;
        };
        let h = find(host, leaf, sub).unwrap_or([0; 4]);
        let lacking = g[reg] & !h[reg] & !ignore;
        if lacking != 0 {
            let name = ["eax", "ebx", "ecx", "edx"][reg];
            return Err(format!("CPUID {leaf:#x}.{sub} {name} bits {lacking:#010x}"));
        }
    }
    Ok(())
}

/// The CPU vendor string from CPUID leaf 0 in KVM's supported list.
pub fn cpu_vendor(supported: &CpuId) -> String {
    let Some(e) = supported.as_slice().iter().find(|e| e.function == 0) else {
        return "unknown".into();
    };
    let mut bytes = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        bytes.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One snapshot's memory in a chain: its memory file and, for a diff, the
/// pages it holds.
pub struct MemoryLayer {
    pub dir: PathBuf,
    pub file: File,
    pub dirty: Option<Vec<Vec<u64>>>,
}

/// The memory files that make up `top`'s guest memory, the full one first
/// and then each diff in the order taken: `dir` and the `parent`
/// directories nested in it. Every snapshot in the chain must describe
/// the same memory layout and be the one its child was taken against.
pub fn memory_chain(dir: &Path, top: &Snapshot) -> Result<Vec<MemoryLayer>> {
    let mut chain = vec![MemoryLayer {
        dir: dir.to_path_buf(),
        file: open_memory_file(dir, &top.info)?,
        dirty: top.dirty.clone(),
    }];
    let mut parent = top.info.parent;
    let mut at = dir.to_path_buf();
    while let Some(parent_id) = parent {
        if chain.len() > MAX_DIFF_CHAIN {
            return Err(Error::Snapshot(format!(
                "{}: more than {MAX_DIFF_CHAIN} diff snapshots deep",
                dir.display()
            )));
        }
        let parent_dir = at.join(PARENT_DIR);
        check_plain_dir(&parent_dir)?;
        let (path, bytes) = read_state_file(&parent_dir)?;
        let snap = Snapshot::from_bytes(&path, &bytes)?;
        if snap.info.id != parent_id {
            return Err(Error::Snapshot(format!(
                "{}: its parent {} is not the snapshot it was taken against",
                at.display(),
                parent_dir.display()
            )));
        }
        if snap.info.regions != top.info.regions {
            return Err(Error::Snapshot(format!(
                "{}: its parent {} has a different memory layout",
                at.display(),
                parent_dir.display()
            )));
        }
        chain.push(MemoryLayer {
            file: open_memory_file(&parent_dir, &snap.info)?,
            dir: parent_dir.clone(),
            dirty: snap.dirty,
        });
        parent = snap.info.parent;
        at = parent_dir;
    }
    chain.reverse();
    Ok(chain)
}

/// A snapshot's own subdirectory must be just that, not a link to
/// somewhere else.
fn check_plain_dir(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Snapshot(format!(
            "{} is not a directory (a diff keeps its parent there)",
            path.display()
        ))),
        Err(source) => Err(Error::File {
            what: "the parent of a diff snapshot",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Puts the snapshot in `parent` (and its own parents) into `into`, which
/// must not exist: hard links, or sparse copies across filesystems. A diff
/// snapshot then holds everything it needs.
pub fn keep_parent(parent: &Path, into: &Path) -> Result<()> {
    let mut from = parent.to_path_buf();
    let mut to = into.to_path_buf();
    for _ in 0..=MAX_DIFF_CHAIN {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&to)?;
        }
        for name in [STATE_FILE, MEMORY_FILE] {
            link_or_copy(&from.join(name), &to.join(name))?;
        }
        let next = from.join(PARENT_DIR);
        if !next.exists() {
            return Ok(());
        }
        to = to.join(PARENT_DIR);
        from = next;
    }
    Err(Error::Snapshot(format!(
        "{}: more than {MAX_DIFF_CHAIN} diff snapshots deep",
        parent.display()
    )))
}

/// Gives the file `src` a second name `dst`: a hard link, or a copy that
/// keeps its holes where links cannot go.
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e.into()),
        Err(_) => {}
    }
    let from = open_own(src, "snapshot file")?;
    let to = crate::private::create_file(dst, false)?;
    snapshot::memory::copy_sparse(&from, &to).map_err(Error::Io)?;
    to.sync_data()?;
    Ok(())
}

/// Opens a file of a snapshot directory: a regular file, never a link.
fn open_own(path: &Path, what: &'static str) -> Result<File> {
    devices::disk::open_regular(path, false).map_err(|source| Error::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub const WORKING_SET_FILE: &str = "workingset";
const TAG_WORKING_SET: Tag = *b"WSET";

/// The memory chunks a restored guest touched first (see
/// `snapshot::uffd`), kept next to the snapshot so later restores can
/// copy them in before the guest runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub chunk: u32,
    /// Memory-file offsets of the chunks, in first-touch order.
    pub offsets: Vec<u64>,
}

pub fn write_working_set(dir: &Path, set: &WorkingSet) -> Result<()> {
    let mut w = StateWriter::new();
    w.section(TAG_WORKING_SET, encode("working set", set)?);
    // A fresh name made with O_EXCL (never a file or link already there),
    // then renamed over the old set.
    let mut tmp = tempfile::Builder::new()
        .prefix(".workingset-")
        .tempfile_in(dir)?;
    std::io::Write::write_all(&mut tmp, &w.to_bytes())?;
    tmp.persist(dir.join(WORKING_SET_FILE))
        .map_err(|e| Error::Io(e.error))?;
    Ok(())
}

/// The snapshot's recorded working set, if it has one. A damaged one is
/// only a lost hint: it is reported and ignored.
pub fn read_working_set(dir: &Path, info: &SnapshotInfo) -> Option<WorkingSet> {
    let path = dir.join(WORKING_SET_FILE);
    let bytes = std::fs::read(&path).ok()?;
    let parsed = container::parse(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|sections| match sections.as_slice() {
            [s] if s.tag == TAG_WORKING_SET => {
                decode::<WorkingSet>(&path, "working set", s.payload).map_err(|e| e.to_string())
            }
            _ => Err("unexpected sections".into()),
        })
        .and_then(|set| {
            let chunks = (info.memory_mib << 20) / u64::from(set.chunk.max(1));
            if set.chunk == 0 || set.chunk % 4096 != 0 || set.offsets.len() as u64 > chunks {
                Err("inconsistent chunk size or count".into())
            } else {
                Ok(set)
            }
        });
    match parsed {
        Ok(set) => Some(set),
        Err(e) => {
            log::warn!("ignoring the working set {}: {e}", path.display());
            None
        }
    }
}

/// Reads `<dir>/state`, refusing anything too big to be ours.
pub fn read_state_file(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join(STATE_FILE);
    let file = open_own(&path, "snapshot state")?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::File {
            what: "snapshot state",
            path: path.clone(),
            source,
        })?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(Error::Snapshot(format!(
            "{}: larger than {} MiB, not a Capsule state file",
            path.display(),
            MAX_STATE_FILE >> 20
        )));
    }
    Ok((path, bytes))
}

/// Opens `<dir>/memory` and checks it holds every region: mapping a file
/// shorter than the guest's RAM would turn the guest's first touch past
/// its end into SIGBUS in the VMM.
pub fn open_memory_file(dir: &Path, info: &SnapshotInfo) -> Result<File> {
    let path = dir.join(MEMORY_FILE);
    let file = open_own(&path, "snapshot memory")?;
    let len = file.metadata()?.len();
    let needed = info.memory_mib << 20;
    if len != needed {
        return Err(Error::Snapshot(format!(
            "{}: {len} bytes where the guest has {needed}",
            path.display()
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shipped snapshot directory can hold links where the working set
    /// (or its temporary file) goes: writing it replaces the link and
    /// never writes through it.
    #[test]
    fn writing_a_working_set_never_follows_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("bashrc");
        std::fs::write(&precious, b"precious").unwrap();
        for name in ["workingset.tmp", WORKING_SET_FILE] {
            std::os::unix::fs::symlink(&precious, dir.path().join(name)).unwrap();
        }
        let set = WorkingSet {
            chunk: 65536,
            offsets: vec![0, 65536],
        };
        write_working_set(dir.path(), &set).unwrap();
        assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
        let written = dir.path().join(WORKING_SET_FILE);
        let meta = std::fs::symlink_metadata(&written).unwrap();
        assert!(meta.is_file(), "the link was replaced by the file");
        let bytes = std::fs::read(&written).unwrap();
        let sections = container::parse(&bytes).unwrap();
        assert_eq!(sections.len(), 1);
        assert_eq!(sections[0].tag, TAG_WORKING_SET);
    }
}
