//! Writing a snapshot of a running VM: vCPU, VM and device state into the
//! state file, guest memory (all of it, or what changed since the last
//! snapshot) into the memory file, and each device's own files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Vm;
use crate::cpu::vcpu::VcpuHandle;
use crate::error::{Error, Result};
use crate::memory;
use crate::persist::{self, SavedRegion, Snapshot, SnapshotInfo};
use crate::vstate;

/// What taking a snapshot did.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotStats {
    /// Guest memory bytes written (non-zero pages).
    pub memory_bytes_written: u64,
    /// Guest memory bytes left as holes because they were zero.
    pub memory_zero_bytes: u64,
    /// How long the guest was paused for it.
    pub paused_for: Duration,
}

/// The snapshot a VM's dirty log counts from.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotRef {
    pub dir: PathBuf,
    pub id: u64,
    /// Diffs between it and a full snapshot.
    pub depth: usize,
}

/// Whether KVM logs the pages the guest writes, and since which snapshot.
#[derive(Default)]
pub(crate) struct DirtyLog {
    pub on: bool,
    /// The snapshot the dirty log counts from: a diff snapshot is against
    /// it.
    pub last_snapshot: Option<SnapshotRef>,
}

pub(crate) fn random_u64() -> Result<u64> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut bytes)
    })?;
    Ok(u64::from_le_bytes(bytes))
}

impl Vm {
    /// Writes a snapshot of the VM into `dir` (created if needed): its
    /// state file and its memory file. A running VM is paused for the
    /// duration and resumed after; a paused one stays paused. Writable
    /// disks are frozen where they are (the VM carries on in a
    /// copy-on-write layer) and must not change before a restore.
    pub fn snapshot(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.take_snapshot(dir.as_ref(), false)
    }

    /// Like [`Vm::snapshot`], but the memory file holds only the pages
    /// written since this VM's previous snapshot (or the snapshot it was
    /// restored from with `track_dirty`), which must be kept: restoring
    /// the diff reads it too.
    pub fn snapshot_diff(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.take_snapshot(dir.as_ref(), true)
    }

    /// Records which memory chunks this VM, restored with
    /// `MemoryBackend::Uffd`, has touched so far into its snapshot
    /// directory `dir`, for later restores to prefetch. Returns how many.
    pub fn save_working_set(&self, dir: impl AsRef<Path>) -> Result<usize> {
        let Some(server) = &self.uffd else {
            return Err(Error::Config(
                "only a VM restored with MemoryBackend::Uffd records a working set".into(),
            ));
        };
        let offsets = server.touched();
        let n = offsets.len();
        persist::write_working_set(
            dir.as_ref(),
            &persist::WorkingSet {
                chunk: snapshot::uffd::DEFAULT_CHUNK as u32,
                offsets,
            },
        )?;
        Ok(n)
    }

    fn take_snapshot(&mut self, dir: &Path, diff: bool) -> Result<SnapshotStats> {
        let parent = match (&self.dirty.last_snapshot, diff) {
            (_, false) => None,
            (Some(parent), true) if self.dirty.on => {
                if parent.depth + 1 >= persist::MAX_DIFF_CHAIN {
                    return Err(Error::Snapshot(format!(
                        "{} diff snapshots in a row is the most a restore follows: take a full one",
                        parent.depth + 1
                    )));
                }
                Some(parent.clone())
            }
            _ => {
                return Err(Error::Snapshot(
                    "a diff snapshot needs an earlier snapshot of this VM to be a diff against"
                        .into(),
                ))
            }
        };
        let dir = std::path::absolute(dir)?;
        // Never over an existing snapshot: its layers may be other disks'
        // bases and its memory other diffs' parent.
        if std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(Error::Snapshot(format!(
                "{} is not empty: snapshots go into a new directory",
                dir.display()
            )));
        }
        let id = random_u64()?;
        let was_paused = self.paused;
        let paused_at = Instant::now();
        self.pause()?;
        let written = self.write_snapshot(&dir, parent.as_ref(), id);
        // A diff is against what was just written; after a failure the dirty
        // log may have been consumed, so only a full snapshot is safe next.
        self.dirty.last_snapshot = written.as_ref().ok().map(|_| SnapshotRef {
            dir: dir.clone(),
            id,
            depth: parent.as_ref().map_or(0, |p| p.depth + 1),
        });
        if written.is_err() {
            for tmp in [persist::MEMORY_FILE, persist::STATE_FILE] {
                let _ = std::fs::remove_file(dir.join(format!("{tmp}.tmp")));
            }
        }
        let paused_for = paused_at.elapsed();
        if !was_paused {
            self.resume()?;
        }
        let (memory_bytes_written, memory_zero_bytes) = written?;
        Ok(SnapshotStats {
            memory_bytes_written,
            memory_zero_bytes,
            paused_for,
        })
    }

    fn write_snapshot(
        &mut self,
        dir: &Path,
        parent: Option<&SnapshotRef>,
        id: u64,
    ) -> Result<(u64, u64)> {
        let diff = parent.is_some();
        // Guest memory is in there: the user's alone.
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        // A diff keeps the snapshot it is against (links): it is whole on
        // its own, and its state file never exists without it.
        if let Some(parent) = parent {
            persist::keep_parent(&parent.dir, &dir.join(persist::PARENT_DIR))?;
        }
        let work_dir = self
            .config
            .layer_dir
            .clone()
            .unwrap_or_else(|| self.runtime.path.clone());
        crate::private::ensure_private_dir(&work_dir)?;
        let devices =
            crate::device_manager::save_devices(&self.serial, &self.transports, dir, &work_dir)?;
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<Vec<_>>>()?;
        let vm = vstate::save(&self.vm_fd)?;

        // The memory file first, under a temporary name: a state file
        // never points at a half-written memory file.
        let memory_tmp = dir.join(format!("{}.tmp", persist::MEMORY_FILE));
        let file = crate::private::create_file(&memory_tmp, false)?;
        // From the first snapshot on, KVM logs the guest's writes; what is
        // logged before this point is in this snapshot.
        if !self.dirty.on {
            memory::register(&self.vm_fd, &self.mem, true)?;
            self.dirty.on = true;
        }
        let dirty = memory::take_dirty(&self.vm_fd, &self.mem)?;
        let (layout, stats) = if diff {
            snapshot::memory::write_diff(&self.mem, &file, &dirty)
        } else {
            snapshot::memory::write_full(&self.mem, &file)
        }
        .map_err(|e| Error::Snapshot(e.to_string()))?;
        file.sync_data()?;
        drop(file);

        let supported = vstate::supported_cpuid(&self.kvm)?;
        let info = SnapshotInfo {
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            cpu_vendor: persist::cpu_vendor(&supported),
            cpus: self.config.cpus,
            memory_mib: self.config.memory_mib,
            regions: layout
                .iter()
                .map(|r| SavedRegion {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    file_offset: r.file_offset,
                })
                .collect(),
            annotation: self.annotation.clone(),
            id,
            parent: parent.map(|p| p.id),
        };
        let bytes = Snapshot {
            info,
            vm,
            vcpus,
            devices,
            dirty: diff.then_some(dirty),
        }
        .to_bytes()?;
        let state_tmp = dir.join(format!("{}.tmp", persist::STATE_FILE));
        {
            use std::io::Write;
            let mut f = crate::private::create_file(&state_tmp, false)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
        }
        std::fs::rename(&memory_tmp, dir.join(persist::MEMORY_FILE))?;
        std::fs::rename(&state_tmp, dir.join(persist::STATE_FILE))?;
        Ok((stats.bytes_written, stats.zero_bytes_skipped))
    }
}
