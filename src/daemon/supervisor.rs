//! One `capsule-vmm` child per sandbox, watched by its pidfd.
//!
//! ```text
//! $CAPSULE_HOME/daemon/vms/<id>/
//!     runtime/     the child's working directory (control.sock, vsock.sock, console.log)
//!     rootfs.ext4  the sandbox's own copy of the root filesystem it was created from
//!     vmm.log      the child's own messages
//! ```
//!
//! Children run in process groups of their own and outlive the daemon; a
//! restarted daemon adopts the ones that still answer ([`Supervisor::adopt`]).
//! Every sandbox that ends is recorded with its reason before its files go.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use sandbox::{AgentClient, ChildOptions, ChildVm, Machine, Sandbox, VmSettings};

use super::pidfd::PidFd;
use crate::labels::Labels;
use crate::store::{EndReason, NewSandbox, SandboxRecord, SandboxState, Store, StoreError};

/// How long a guest may take from launch to its agent answering.
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a sandbox's VM comes from.
#[derive(Clone, Debug)]
pub enum Origin {
    /// Booted from a kernel and initramfs, with its own copy of `rootfs`.
    Boot {
        kernel: PathBuf,
        initramfs: PathBuf,
        rootfs: Option<PathBuf>,
    },
    /// Restored from a template (or a sandbox's snapshot), with a fresh
    /// identity.
    Template(String),
}

/// What to make a sandbox from (checked by the API).
#[derive(Clone, Debug)]
pub struct CreateSpec {
    pub origin: Origin,
    pub cpus: u8,
    pub memory_mib: u32,
    pub group: String,
    pub labels: Labels,
    pub end_at: Option<i64>,
    pub source: serde_json::Value,
    pub secrets: Vec<String>,
    pub idle_suspend_ms: Option<i64>,
}

/// A running sandbox: its child, for control, and its agent, for commands.
pub struct Live {
    pub child: Mutex<ChildVm>,
    pub agent: AgentClient,
    pub pid: u32,
    pub activity: Activity,
}

/// Commands running in a sandbox, and when the last began or ended: what
/// idle suspend goes by.
#[derive(Default)]
pub struct Activity {
    running: std::sync::atomic::AtomicUsize,
    last: Mutex<Option<std::time::Instant>>,
}

/// Held while a command runs in a sandbox.
pub struct Busy(Arc<Live>);

impl Live {
    /// Counts idle time from now (a pooled sandbox just taken).
    fn reset_idle(&self) {
        *lock(&self.activity.last) = Some(std::time::Instant::now());
    }

    pub fn busy(self: &Arc<Self>) -> Busy {
        self.activity
            .running
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        *lock(&self.activity.last) = Some(std::time::Instant::now());
        Busy(Arc::clone(self))
    }
}

impl Activity {
    /// Whether nothing has run for `idle`.
    fn idle_for(&self, idle: Duration) -> bool {
        self.running.load(std::sync::atomic::Ordering::SeqCst) == 0
            && lock(&self.last).is_none_or(|t| t.elapsed() >= idle)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let activity = &self.0.activity;
        *lock(&activity.last) = Some(std::time::Instant::now());
        activity
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Busy {
    pub fn live(&self) -> &Arc<Live> {
        &self.0
    }
}

pub struct Supervisor {
    pub(super) root: PathBuf,
    /// The most live sandboxes this host runs, over every group.
    max_sandboxes: Option<u32>,
    store: Arc<Mutex<Store>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Restored sandboxes kept ready, by template (see the pool module).
    pub(super) pool: Mutex<HashMap<String, Vec<super::pool::Pooled>>>,
    /// Sandboxes (and template names) an operation is under way on.
    operations: Mutex<std::collections::HashSet<String>>,
    /// Template builds under way: VMs the host's limit counts.
    pub(super) building: Mutex<u32>,
    /// Woken after every change the event log records.
    pub changed: tokio::sync::Notify,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `chars` random characters of lowercase base 32 (5 bits each).
pub fn random_word(chars: usize) -> Result<String> {
    use std::io::Read;
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = vec![0u8; chars];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 31)] as char)
        .collect())
}

/// A fresh sandbox id: `sb-` and 16 random characters (80 bits), lowercase
/// so it can stand in a host name (`8000-sb-....localhost`). Unique across
/// hosts, not only on this one.
pub fn new_id() -> Result<String> {
    Ok(format!("sb-{}", random_word(16)?))
}

impl Supervisor {
    pub fn new(
        root: PathBuf,
        store: Arc<Mutex<Store>>,
        max_sandboxes: Option<u32>,
    ) -> Result<Arc<Supervisor>> {
        vmm::private::ensure_private_dir(&root)?;
        vmm::private::ensure_private_dir(&root.join("vms"))?;
        Ok(Arc::new(Supervisor {
            root,
            max_sandboxes,
            store,
            live: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            operations: Mutex::new(std::collections::HashSet::new()),
            building: Mutex::new(0),
            changed: tokio::sync::Notify::new(),
        }))
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub(super) fn dir(&self, id: &str) -> PathBuf {
        self.root.join("vms").join(id)
    }

    pub fn live(&self, id: &str) -> Option<Arc<Live>> {
        lock(&self.live).get(id).cloned()
    }

    pub(super) fn notify(&self) {
        self.changed.notify_waiters();
    }

    /// Records the sandbox (refused if its group's quota would be passed),
    /// boots it in a child and waits for its agent. Blocks: run it off the
    /// async threads.
    pub fn create(self: &Arc<Self>, spec: CreateSpec) -> Result<SandboxRecord, CreateError> {
        // From a template with a warm pool: one already restored.
        let pooled = match &spec.origin {
            Origin::Template(name) => self.take_pooled(name),
            Origin::Boot { .. } => None,
        };
        let id = match &pooled {
            Some(p) => p.id.clone(),
            None => new_id().map_err(CreateError::Other)?,
        };
        // Read before the store is locked: the limit takes other locks.
        let record_limit = self.record_limit();
        let inserted = self.store().insert_sandbox(
            &NewSandbox {
                id: id.clone(),
                group: spec.group.clone(),
                source: spec.source.clone(),
                cpus: u32::from(spec.cpus),
                memory_mib: spec.memory_mib,
                labels: spec.labels.clone(),
                end_at: spec.end_at,
                secrets: spec.secrets.clone(),
                idle_suspend_ms: spec.idle_suspend_ms,
            },
            record_limit,
        );
        let record = match (inserted, pooled) {
            (Ok(record), pooled) => (record, pooled),
            (Err(e), pooled) => {
                if let (Some(p), Origin::Template(name)) = (pooled, &spec.origin) {
                    self.give_back(name, p);
                }
                return Err(CreateError::Store(e));
            }
        };
        let (record, pooled) = record;
        let _op = self.begin(&id).map_err(CreateError::Store)?;
        self.notify();
        log::info!(
            "sandbox {id}: creating from {}{}",
            record.source,
            if pooled.is_some() { " (warm pool)" } else { "" }
        );
        let made = match (pooled, &spec.origin) {
            (Some(p), _) => {
                p.live.reset_idle();
                Ok(p.live)
            }
            (None, Origin::Boot { .. }) => self.boot(&id, &spec),
            (None, Origin::Template(name)) => self.restore_template(&id, name),
        };
        match made {
            Ok(live) => {
                let pid = live.pid;
                let runtime = self.dir(&id).join("runtime");
                let mut store = self.store();
                store
                    .set_vmm(&id, Some(pid as i32), Some(&runtime.to_string_lossy()))
                    .map_err(CreateError::Store)?;
                let record = store
                    .transition(
                        &id,
                        &[SandboxState::Creating],
                        SandboxState::Running,
                        "ready",
                    )
                    .map_err(CreateError::Store)?;
                drop(store);
                lock(&self.live).insert(id.clone(), live);
                self.watch(&id, pid);
                self.notify();
                log::info!("sandbox {id}: running (capsule-vmm pid {pid})");
                Ok(record)
            }
            Err(e) => {
                let detail = format!("{e:#}");
                log::warn!("sandbox {id}: could not be created: {detail}");
                let _ = self
                    .store()
                    .end_sandbox(&id, EndReason::CreateFailed, &detail);
                let _ = std::fs::remove_dir_all(self.dir(&id));
                self.notify();
                Err(CreateError::Boot { id, detail })
            }
        }
    }

    fn boot(&self, id: &str, spec: &CreateSpec) -> Result<Arc<Live>> {
        let dir = self.dir(id);
        vmm::private::ensure_private_dir(&dir)?;
        let runtime = dir.join("runtime");
        let Origin::Boot {
            kernel,
            initramfs,
            rootfs,
        } = &spec.origin
        else {
            return Err(anyhow!("not a boot"));
        };
        let mut sb = boot_in(
            &dir,
            kernel,
            initramfs,
            rootfs.as_deref(),
            spec.cpus,
            spec.memory_mib,
        )?;
        sb.wait_ready(BOOT_TIMEOUT)?;
        let child = sb.into_machine();
        let pid = child.detach();
        connect(&runtime, pid).inspect_err(|_| kill_detached(pid))
    }

    /// Watches a child's pidfd; if it ends while its sandbox is live, the
    /// sandbox ends with how it did.
    fn watch(self: &Arc<Self>, id: &str, pid: u32) {
        let unwatched = |me: &Self, why: String| {
            if let Some(live) = me.take_live(id, pid) {
                lock(&live.child).kill();
            }
            me.lost(
                id,
                &format!("its VMM process {pid} could not be watched: {why}"),
            );
        };
        let pidfd = match PidFd::open(pid) {
            Ok(fd) => fd,
            Err(e) => return unwatched(self, e.to_string()),
        };
        let (me, id_owned) = (Arc::clone(self), id.to_string());
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{id}"))
            .spawn(move || {
                let id = id_owned;
                pidfd.wait();
                let status = pidfd.reap();
                // Only the VM this watcher watches: after a suspend and a
                // resume the map holds another one under the same id.
                let Some(live) = me.take_live(&id, pid) else {
                    return; // deleted or suspended: that recorded why
                };
                let exit = lock(&live.child).exit_reason();
                let (reason, detail) = match (&exit, status) {
                    (Some(vmm::VmExit::GuestPowerOff), _) | (Some(vmm::VmExit::GuestReset), _) => (
                        EndReason::GuestPoweredOff,
                        "the guest powered off".to_string(),
                    ),
                    (_, Some(status)) => (EndReason::VmmDied, format!("its VMM process {status}")),
                    (Some(exit), None) => (EndReason::VmmDied, format!("its VM stopped: {exit}")),
                    (None, None) => (EndReason::VmmDied, "its VMM process ended".to_string()),
                };
                log::warn!("sandbox {id}: ended: {detail}");
                let _ = me.store().end_sandbox(&id, reason, &detail);
                let _ = std::fs::remove_dir_all(me.dir(&id));
                me.notify();
            });
        if let Err(e) = spawned {
            unwatched(self, e.to_string());
        }
    }

    /// Takes the live sandbox `id` out of the map if it is the VM of
    /// process `pid`.
    fn take_live(&self, id: &str, pid: u32) -> Option<Arc<Live>> {
        let mut live = lock(&self.live);
        if live.get(id).is_some_and(|l| l.pid == pid) {
            live.remove(id)
        } else {
            None
        }
    }

    /// Marks `key` (a sandbox id, or `template:<name>`) as being worked on
    /// until the guard drops; a second operation on it is a conflict.
    pub(super) fn begin(&self, key: &str) -> Result<Operation<'_>, StoreError> {
        if !lock(&self.operations).insert(key.to_string()) {
            return Err(StoreError::Conflict(format!(
                "{key} is busy with another operation; try again"
            )));
        }
        Ok(Operation {
            supervisor: self,
            key: key.to_string(),
        })
    }

    fn lost(&self, id: &str, detail: &str) {
        log::warn!("sandbox {id}: lost: {detail}");
        let _ = self.store().end_sandbox(id, EndReason::Lost, detail);
        let _ = std::fs::remove_dir_all(self.dir(id));
        self.notify();
    }

    /// Ends a sandbox for `reason`: recorded first (so its watcher does
    /// not take the kill for a death), then its child is stopped and its
    /// files removed.
    pub fn destroy(&self, id: &str, reason: EndReason, detail: &str) -> Result<(), StoreError> {
        let _op = self.begin(id)?;
        let mut store = self.store();
        if !store.end_sandbox(id, reason, detail)? {
            let first = store.sandbox(id)?.end_reason;
            return Err(StoreError::Conflict(format!(
                "sandbox {id} has already ended ({})",
                first.map_or("?", <&str>::from)
            )));
        }
        drop(store);
        let live = lock(&self.live).remove(id);
        if let Some(live) = live {
            lock(&live.child).kill();
        }
        let _ = std::fs::remove_dir_all(self.dir(id));
        self.notify();
        log::info!(
            "sandbox {id}: ended ({reason}{})",
            if detail.is_empty() {
                String::new()
            } else {
                format!(": {detail}")
            }
        );
        Ok(())
    }

    /// After a restart: adopts each running sandbox whose child still
    /// answers, and ends the rest (and any left half-made) as lost.
    pub fn adopt(self: &Arc<Self>) -> Result<()> {
        let records = self.store().sandboxes(&[
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Suspended,
        ])?;
        for record in records {
            let id = &record.id;
            let runtime = self.dir(id).join("runtime");
            if record.state == SandboxState::Suspended {
                // A suspend or a resume the daemon did not finish: the
                // store says suspended, so no child may run (found by its
                // working directory: it may not answer yet).
                kill_processes_in(&runtime);
                let _ = finish_suspend(&self.dir(id));
                if !self.dir(id).join(SUSPENDED).is_dir() {
                    self.lost(id, "its suspended state was gone when the daemon restarted");
                }
                continue;
            }
            if record.state == SandboxState::Creating {
                // Its child may not have reached its control socket yet:
                // it is found by its working directory instead.
                kill_processes_in(&runtime);
                self.lost(id, "the daemon stopped while it was being created");
                continue;
            }
            let pid = record.vmm_pid.unwrap_or(0) as u32;
            // A suspend that had not reached the store: it never happened.
            let _ = std::fs::remove_dir_all(self.dir(id).join(SUSPENDING));
            match connect(&runtime, pid) {
                Ok(live) => {
                    let pid = live.pid;
                    lock(&self.live).insert(id.clone(), live);
                    self.watch(id, pid);
                    log::info!("sandbox {id}: adopted (capsule-vmm pid {pid})");
                }
                Err(e) => {
                    // Whatever runs there answers for no record now.
                    kill_processes_in(&runtime);
                    self.lost(
                        id,
                        &format!("its VMM was gone when the daemon restarted ({e:#})"),
                    )
                }
            }
        }
        Ok(())
    }

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
        let _op = self.begin(id)?;
        let record = self.store().sandbox(id)?;
        if record.state != SandboxState::Running {
            return Err(StoreError::Conflict(format!(
                "sandbox {id} is {}, not running",
                record.state
            ))
            .into());
        }
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
        lock(&live.child).kill();
        // Recorded as suspended already; a last step that fails here is
        // finished by the resume (or the next daemon).
        if let Err(e) = finish_suspend(&dir) {
            log::warn!("sandbox {id}: suspended, but {e}");
        }
        self.notify();
        log::info!("sandbox {id}: suspended");
        Ok(record)
    }

    /// Resumes a suspended sandbox in place: the same id, memory and
    /// disks, in a new VMM process. Blocks.
    pub fn resume(self: &Arc<Self>, id: &str) -> Result<SandboxRecord, LifecycleError> {
        let _op = self.begin(id)?;
        let record = self.store().sandbox(id)?;
        if record.state != SandboxState::Suspended {
            return Err(StoreError::Conflict(format!(
                "sandbox {id} is {}, not suspended",
                record.state
            ))
            .into());
        }
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
                let pid = sb.into_machine().detach();
                connect(&runtime, pid)
                    .inspect_err(|_| kill_detached(pid))
                    .map_err(|e| LifecycleError::Failed(format!("{e:#}")))
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
        lock(&self.live).insert(id.to_string(), live);
        self.watch(id, pid);
        self.notify();
        log::info!("sandbox {id}: resumed (capsule-vmm pid {pid})");
        Ok(record)
    }

    /// Suspends the running sandboxes that asked for it and have had no
    /// command for their idle time.
    pub fn suspend_idle(self: &Arc<Self>) {
        let records = match self.store().sandboxes(&[SandboxState::Running]) {
            Ok(records) => records,
            Err(e) => {
                log::error!("idle suspend: {e}");
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
                match self.suspend_if(&record.id, Some(idle)) {
                    Ok(_) => log::info!("sandbox {}: suspended after {idle:?} idle", record.id),
                    Err(e) => log::debug!("sandbox {}: not suspended for idleness: {e}", record.id),
                }
            }
        }
    }

    /// Refuses a new VM when the host runs its most sandboxes already.
    /// VMs that are not sandbox records: a pool's ready ones and template
    /// builds. The host's limit counts them too.
    fn unrecorded_vms(&self, building: u32) -> u32 {
        let pooled: usize = lock(&self.pool).values().map(Vec::len).sum();
        (pooled as u32).saturating_add(building)
    }

    /// The host's limit as it applies to sandbox records now.
    fn record_limit(&self) -> Option<u32> {
        let building = *lock(&self.building);
        self.max_sandboxes
            .map(|limit| limit.saturating_sub(self.unrecorded_vms(building)))
    }

    /// Makes room for one more VM that is not a record (a build, a pooled
    /// sandbox), or refuses; the room is held until the guard drops.
    pub(super) fn host_room(&self) -> Result<Building<'_>, StoreError> {
        let mut building = lock(&self.building);
        if let Some(limit) = self.max_sandboxes {
            let records = self
                .store()
                .sandboxes(&[
                    SandboxState::Creating,
                    SandboxState::Running,
                    SandboxState::Suspended,
                ])?
                .len() as u64;
            if records + u64::from(self.unrecorded_vms(*building)) >= u64::from(limit) {
                return Err(StoreError::HostFull { limit });
            }
        }
        *building += 1;
        Ok(Building(self))
    }

    /// Stops and removes what no record owns under `vms/`: a pool's
    /// sandboxes from before a restart, a create that never got recorded.
    pub fn remove_strays(&self) -> Result<()> {
        let known: std::collections::HashSet<String> = self
            .store()
            .sandboxes(&[])?
            .into_iter()
            .filter(|r| r.state != SandboxState::Ended)
            .map(|r| r.id)
            .collect();
        for entry in std::fs::read_dir(self.root.join("vms"))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                kill_processes_in(&entry.path().join("runtime"));
                let _ = std::fs::remove_dir_all(entry.path());
                log::info!("removed {name}, which no sandbox record owns");
            }
        }
        // A template build the daemon did not finish: its VM, and its
        // files, which no record names.
        if let Ok(entries) = std::fs::read_dir(self.root.join("templates")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                kill_processes_in(&entry.path().join("runtime"));
                if !self.store().template_exists(&name).unwrap_or(true) {
                    let _ = std::fs::remove_dir_all(entry.path());
                    log::info!("removed template {name}'s unfinished build");
                }
            }
        }
        Ok(())
    }

    /// Ends the sandboxes whose time is up.
    pub fn expire(&self, now_ms: i64) {
        let due: Vec<String> = match self
            .store()
            .sandboxes(&[SandboxState::Running, SandboxState::Suspended])
        {
            Ok(records) => records
                .into_iter()
                .filter(|r| r.end_at.is_some_and(|at| at <= now_ms))
                .map(|r| r.id)
                .collect(),
            Err(e) => {
                log::error!("expiry: {e}");
                return;
            }
        };
        for id in due {
            let _ = self.destroy(&id, EndReason::Expired, "its timeout passed");
        }
    }
}

/// Room held on the host for a VM that is not a record yet.
pub(super) struct Building<'a>(&'a Supervisor);

impl Drop for Building<'_> {
    fn drop(&mut self) {
        let mut building = lock(&self.0.building);
        *building = building.saturating_sub(1);
    }
}

/// An operation under way on a sandbox or template name; see
/// [`Supervisor::begin`].
pub(super) struct Operation<'a> {
    supervisor: &'a Supervisor,
    key: String,
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        lock(&self.supervisor.operations).remove(&self.key);
    }
}

/// Stops a child this daemon detached and reaps it (it is ours), when
/// what follows its start fails.
pub(super) fn kill_detached(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    if let Ok(pidfd) = PidFd::open(pid) {
        pidfd.wait_for(Duration::from_secs(5));
        let _ = pidfd.reap();
    }
}

/// The file name of a sandbox's (or template's) own root filesystem.
pub(super) const ROOTFS: &str = "rootfs.ext4";

/// Starts a child in `dir` booting `kernel` and `initramfs`, with its own
/// copy of `rootfs` (sandboxes made from one image never share writes);
/// its agent is not waited for yet.
pub(super) fn boot_in(
    dir: &Path,
    kernel: &Path,
    initramfs: &Path,
    rootfs: Option<&Path>,
    cpus: u8,
    memory_mib: u32,
) -> Result<Sandbox<ChildVm>> {
    let mut builder = Sandbox::builder()
        .kernel(kernel)
        .initramfs(initramfs)
        .cpus(cpus)
        .memory_mib(u64::from(memory_mib))
        .hostname("capsule");
    if let Some(rootfs) = rootfs {
        let copy = dir.join(ROOTFS);
        std::fs::copy(rootfs, &copy)
            .with_context(|| format!("copying the root filesystem {}", rootfs.display()))?;
        builder = builder.rootfs(copy, false);
    }
    let config = builder.vm_config()?;
    let child = ChildVm::boot(&config, child_options(dir)?).context("cannot start the microVM")?;
    Ok(Sandbox::adopt_booted(child, builder.guest_info())?)
}

/// Where a suspended sandbox's state is, in its directory; it is written
/// to `suspending/` first, and `complete` marks it whole.
const SUSPENDED: &str = "suspended";
const SUSPENDING: &str = "suspending";
const COMPLETE: &str = "complete";

/// With the child gone: a whole `suspending/` replaces `suspended/` (the
/// state it was resumed from, whose layers the new one has linked), and
/// the runtime directory (sockets, the layer the snapshot froze) goes.
fn finish_suspend(dir: &Path) -> Result<(), LifecycleError> {
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

/// How a sandbox's child is started: in `dir/runtime`, in a process group
/// of its own (a signal to the daemon's group, a Ctrl-C, must not reach
/// the sandboxes), its messages appended to `dir/vmm.log`.
pub(super) fn child_options(dir: &Path) -> Result<ChildOptions> {
    let log = vmm::private::create_log(&dir.join("vmm.log"))?;
    let mut options = ChildOptions::new(dir.join("runtime"));
    options.customize = Box::new(move |cmd| {
        std::os::unix::process::CommandExt::process_group(cmd, 0);
        cmd.stderr(log);
    });
    Ok(options)
}

/// SIGKILLs every process whose working directory is `dir` (a child's
/// runtime directory), waiting up to a few seconds for them to go.
pub(super) fn kill_processes_in(dir: &Path) {
    let find = || -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .parse::<i32>()
                    .ok()
                    .map(|pid| (pid, e.path()))
            })
            .filter(|(_, path)| std::fs::read_link(path.join("cwd")).is_ok_and(|cwd| cwd == dir))
            .map(|(pid, _)| pid)
            .collect()
    };
    for pid in find() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let end = std::time::Instant::now() + Duration::from_secs(5);
    while !find().is_empty() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to a child's control socket and its guest's agent.
pub(super) fn connect(runtime: &Path, pid_hint: u32) -> Result<Arc<Live>> {
    let child = ChildVm::connect(runtime)?;
    let pid = child.pid();
    if pid_hint != 0 && pid != pid_hint {
        return Err(anyhow!(
            "its control socket answers for process {pid}, not {pid_hint}"
        ));
    }
    let agent = sandbox::connect_agent(&runtime.join(capsule_vmm::protocol::VSOCK_SOCKET))?;
    let activity = Activity::default();
    // Idle is counted from now: a sandbox just started or adopted.
    *lock(&activity.last) = Some(std::time::Instant::now());
    Ok(Arc::new(Live {
        child: Mutex::new(child),
        agent,
        pid,
        activity,
    }))
}

/// Why a suspend or resume did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Store(StoreError),
    #[error("sandbox {id} could not be created: {detail}")]
    Boot { id: String, detail: String },
    #[error("{0:#}")]
    Other(anyhow::Error),
}
