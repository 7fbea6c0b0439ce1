//! What a sandbox uses of the host, measured from the host: its VMM
//! process's CPU time and memory, the disk its files take, how long its VM
//! has run. Figures the guest reported could be whatever a hostile guest
//! wanted them to be.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use procfs::process::Process;
use procfs::Current;

use super::supervisor::Supervisor;
use crate::store::{SandboxRecord, SandboxState, StoreError};

/// A running sandbox's VMM process, as the host's kernel counts it.
#[derive(Clone, Copy, Debug)]
pub struct ProcessUsage {
    /// User and system time, its vCPU threads' included.
    pub cpu_seconds: f64,
    /// Resident memory: guest memory the guest has touched, and the VMM's.
    pub memory_bytes: u64,
    /// Its proportional share of that: pages it shares with other
    /// sandboxes (forks of one snapshot) count for a fraction each.
    pub memory_pss_bytes: u64,
    /// Since the process started (since its last create or resume).
    pub uptime_seconds: f64,
}

/// What one sandbox uses now.
#[derive(Clone, Debug)]
pub struct SandboxUsage {
    pub record: SandboxRecord,
    /// `None` unless it is running.
    pub process: Option<ProcessUsage>,
    /// Bytes its files take on the host's disk (its root filesystem copy,
    /// disk layers, suspended state), each file once.
    pub disk_bytes: u64,
}

/// Reads `pid`'s usage from /proc.
pub fn process_usage(pid: u32) -> procfs::ProcResult<ProcessUsage> {
    let process = Process::new(pid as i32)?;
    let stat = process.stat()?;
    let ticks = procfs::ticks_per_second() as f64;
    let rollup = process.smaps_rollup()?;
    let field = |name: &str| -> u64 {
        rollup
            .memory_map_rollup
            .iter()
            .filter_map(|m| m.extension.map.get(name))
            .sum()
    };
    let booted_for = procfs::Uptime::current()?.uptime;
    Ok(ProcessUsage {
        cpu_seconds: (stat.utime + stat.stime) as f64 / ticks,
        memory_bytes: field("Rss"),
        memory_pss_bytes: field("Pss"),
        uptime_seconds: (booted_for - stat.starttime as f64 / ticks).max(0.0),
    })
}

/// Bytes allocated to the files under `dir` (not following links; a file
/// with several names counted once); 0 if there is none.
pub fn disk_bytes(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

impl Supervisor {
    /// What sandbox `id` uses of the host now.
    pub fn usage(&self, id: &str) -> Result<SandboxUsage, StoreError> {
        let record = self.store().sandbox(id)?;
        let process = match (record.state, self.live(id)) {
            // A process that just ended reads as none: its watcher is
            // about to record how.
            (SandboxState::Running, Some(live)) => process_usage(live.pid).ok(),
            _ => None,
        };
        let disk_bytes = match record.state {
            SandboxState::Ended => 0,
            _ => disk_bytes(&self.dir(id)),
        };
        Ok(SandboxUsage {
            record,
            process,
            disk_bytes,
        })
    }
}
