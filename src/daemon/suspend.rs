//! Suspending a sandbox to disk and resuming it in place: the same id,
//! memory and disks, in a new VMM process.
//!
//! ```text
//! $CAPSULE_HOME/daemon/vms/<id>/
//!     suspending/  a suspend being written (`complete` marks it whole)
//!     suspended/   the state the sandbox resumes from
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sandbox::{ChildVm, Machine};

use super::child::{child_options, connect_restored, kill_detached, ROOTFS};
use super::logging::sandbox_span;
use super::supervisor::{lock, LifecycleError, Supervisor, BOOT_TIMEOUT};
use crate::store::{SandboxRecord, SandboxState, StoreError};

impl Supervisor {
    /// Suspends a running sandbox to disk: its memory and device state in
    /// `suspended/` (its disks' writes frozen in layers there), its VMM
    /// process gone. Blocks.
    ///
    /// The steps are ordered so a daemon killed between any two leaves
    /// something [`Supervisor::adopt`] finishes: the state is written to
    /// `suspending/` and marked complete, then the store says suspended,
    /// then the child is killed, then `suspending/` replaces `suspended/`.
    pub fn suspend(self: &Arc<Self>, id: &str) -> Result<SandboxRecord, LifecycleError> {
        self.suspend_if(id, None)
    }

    /// [`Supervisor::suspend`], but with `idle`, only if no command has
    /// run for that long (checked once the sandbox is out of the live map,
    /// so a command cannot start in between).
    fn suspend_if(
        self: &Arc<Self>,
        id: &str,
        idle: Option<Duration>,
    ) -> Result<SandboxRecord, LifecycleError> {
        let _span = sandbox_span(id).entered();
        let _op = self.begin(id)?;
        let started = std::time::Instant::now();
        self.require_state(id, SandboxState::Running)?;
        // Out of the live map first: commands are refused from here on,
        // and the watcher takes the child's end for ours.
        let Some(live) = lock(&self.live).remove(id) else {
            return Err(StoreError::Conflict(format!("sandbox {id} is busy")).into());
        };
        if idle.is_some_and(|idle| !live.activity.idle_for(idle)) {
            lock(&self.live).insert(id.to_string(), live);
            return Err(StoreError::Conflict(format!("sandbox {id} is not idle")).into());
        }
        let dir = self.dir(id);
        let partial = dir.join(SUSPENDING);
        let _ = std::fs::remove_dir_all(&partial);
        let written = lock(&live.child)
            .snapshot(&partial, false)
            .map_err(|e| e.to_string())
            .and_then(|_| std::fs::write(partial.join(COMPLETE), b"").map_err(|e| e.to_string()));
        if let Err(e) = written {
            // Not suspended: it carries on as it was.
            let _ = std::fs::remove_dir_all(&partial);
            lock(&self.live).insert(id.to_string(), live);
            return Err(LifecycleError::Failed(format!(
                "sandbox {id} could not be suspended: {e}"
            )));
        }
        let record = {
            let mut store = self.store();
            store.set_vmm(id, None, None)?;
            store.transition(
                id,
                &[SandboxState::Running],
                SandboxState::Suspended,
                "suspended",
            )?
        };
        live.ports.close_all();
        lock(&live.child).kill();
        // Recorded as suspended already; a last step that fails here is
        // finished by the resume (or the next daemon).
        if let Err(e) = finish_suspend(&dir) {
            tracing::warn!("suspended, but {e}");
        }
        self.notify();
        self.metrics.suspended(started.elapsed());
        match idle {
            Some(idle) => tracing::info!("suspended after {idle:?} idle"),
            None => tracing::info!("suspended"),
        }
        Ok(record)
    }

    /// Refuses (409) unless sandbox `id` is in state `want`.
    fn require_state(&self, id: &str, want: SandboxState) -> Result<(), StoreError> {
        let state = self.store().sandbox(id)?.state;
        if state != want {
            return Err(StoreError::Conflict(format!(
                "sandbox {id} is {state}, not {want}"
            )));
        }
        Ok(())
    }

    /// Resumes a suspended sandbox in place: the same id, memory and
    /// disks, in a new VMM process. Blocks.
    pub fn resume(self: &Arc<Self>, id: &str) -> Result<SandboxRecord, LifecycleError> {
        let _span = sandbox_span(id).entered();
        let _op = self.begin(id)?;
        let started = std::time::Instant::now();
        self.require_state(id, SandboxState::Suspended)?;
        let dir = self.dir(id);
        let runtime = dir.join("runtime");
        // A suspend whose last step failed: its whole state is the one to
        // resume from.
        finish_suspend(&dir)?;
        let rootfs = dir.join(ROOTFS);
        let options = sandbox::RestoreOptions {
            vm: vmm::RestoreOptions {
                disks: if rootfs.exists() {
                    vec![rootfs.into()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
            timeout: Some(BOOT_TIMEOUT),
            ..Default::default()
        };
        let child = child_options(&dir).map_err(|e| LifecycleError::Failed(format!("{e:#}")))?;
        let restored = ChildVm::restore(&dir.join(SUSPENDED), &options, child)
            .map_err(|e| LifecycleError::Failed(format!("sandbox {id} could not be resumed: {e}")))
            .and_then(|sb| {
                connect_restored(sb, &runtime).map_err(|e| LifecycleError::Failed(format!("{e:#}")))
            });
        let live = restored?;
        let pid = live.pid;
        let recorded = {
            let mut store = self.store();
            store
                .set_vmm(id, Some(pid as i32), Some(&runtime.to_string_lossy()))
                .and_then(|()| {
                    store.transition(
                        id,
                        &[SandboxState::Suspended],
                        SandboxState::Running,
                        "resumed",
                    )
                })
        };
        let record = match recorded {
            Ok(record) => record,
            Err(e) => {
                // Not recorded as running: it must not run.
                lock(&live.child).kill();
                kill_detached(pid);
                return Err(e.into());
            }
        };
        self.open_ports(id, &live);
        lock(&self.live).insert(id.to_string(), live);
        self.watch(id, pid);
        self.notify();
        self.metrics.resumed(started.elapsed());
        tracing::info!("resumed (capsule-vmm pid {pid})");
        Ok(record)
    }

    /// Suspends the running sandboxes that asked for it and have had no
    /// command for their idle time.
    pub fn suspend_idle(self: &Arc<Self>) {
        let records = match self.store().sandboxes(&[SandboxState::Running]) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("idle suspend: {e}");
                return;
            }
        };
        for record in records {
            let Some(ms) = record.idle_suspend_ms else {
                continue;
            };
            let idle = Duration::from_millis(ms.max(0) as u64);
            let due = self
                .live(&record.id)
                .is_some_and(|live| live.activity.idle_for(idle));
            if due {
                if let Err(e) = self.suspend_if(&record.id, Some(idle)) {
                    tracing::debug!(sandbox = %record.id, "not suspended for idleness: {e}");
                }
            }
        }
    }
}

/// Where a suspended sandbox's state is, in its directory; it is written
/// to `suspending/` first, and `complete` marks it whole.
pub(super) const SUSPENDED: &str = "suspended";
pub(super) const SUSPENDING: &str = "suspending";
const COMPLETE: &str = "complete";

/// With the child gone: a whole `suspending/` replaces `suspended/` (the
/// state it was resumed from, whose layers the new one has linked), and
/// the runtime directory (sockets, the layer the snapshot froze) goes.
pub(super) fn finish_suspend(dir: &Path) -> Result<(), LifecycleError> {
    let (partial, done) = (dir.join(SUSPENDING), dir.join(SUSPENDED));
    if partial.join(COMPLETE).is_file() {
        let _ = std::fs::remove_dir_all(&done);
        std::fs::rename(&partial, &done)
            .map_err(|e| LifecycleError::Failed(format!("keeping the suspended state: {e}")))?;
    }
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(dir.join("runtime"));
    Ok(())
}
