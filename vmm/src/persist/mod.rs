//! What a snapshot directory holds and how it is written and read back.
//!
//! ```text
//! <dir>/state              the state file: snapshot::container sections
//!                          INFO (SnapshotInfo), VMST (VmState), VCPU x N, DEVS
//! <dir>/memory             guest RAM, regions back to back, zero pages as holes
//! <dir>/...                each device's own files (disk<i>.<j>.layer: disk
//!                          i's copy-on-write layers, bottom first)
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

mod chain;
mod cpu;
mod working_set;

pub use chain::{keep_parent, memory_chain, open_memory_file, read_state_file, MemoryLayer};
pub use cpu::cpu_vendor;
pub use working_set::{read_working_set, write_working_set, WorkingSet, WORKING_SET_FILE};

use std::path::Path;

use devices::legacy::SerialSnapshot;
use devices::virtio::mmio::MmioState;
use devices::virtio::persist::{ExternalFile, SavedDevice};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, CpuId};
use serde::{Deserialize, Serialize};
use snapshot::container::{self, StateWriter, Tag};

use crate::cpu::state::VcpuState;
use crate::error::{Error, Result};
use crate::layout::MAX_VCPUS;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// A state file is a few hundred KiB at most (vCPU and device state);
/// anything far bigger is not ours.
pub(crate) const MAX_STATE_FILE: u64 = 64 << 20;

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
    /// Bytes the embedding program keeps with the snapshot, opaque here
    /// ([`crate::Vm::set_annotation`]).
    pub annotation: Vec<u8>,
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
    pub device: SavedDevice,
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

pub(crate) fn encode<T: Serialize>(what: &str, value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Snapshot(format!("encoding {what}: {e}")))
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(
    path: &Path,
    what: &str,
    bytes: &'a [u8],
) -> Result<T> {
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
        if self.devices.virtio.len() > crate::device_manager::MAX_VIRTIO_DEVICES {
            return Err(bad("too many devices".into()));
        }
        if self
            .external_files()
            .iter()
            .any(|f| f.name.len() > devices::virtio::persist::EXTERNAL_NAME_MAX)
        {
            return Err(bad("an external file's name is too long".into()));
        }
        if info.annotation.len() > crate::vm::MAX_ANNOTATION {
            return Err(bad("the annotation is too long".into()));
        }
        Ok(())
    }

    /// The files outside the snapshot its devices are built over, in
    /// device order: what a restore names again.
    pub fn external_files(&self) -> Vec<&ExternalFile> {
        self.devices
            .virtio
            .iter()
            .filter_map(|v| v.device.external.as_ref())
            .collect()
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
            cpu::missing_features(&vcpu.cpuid, supported.as_slice()).map_err(|m| {
                Error::SnapshotIncompatible(format!(
                    "vCPU {i} uses CPU features this host lacks ({m})"
                ))
            })?;
        }
        Ok(())
    }
}
