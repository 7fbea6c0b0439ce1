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
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use sandbox::{AgentClient, ChildVm, Machine};

use super::child::{
    boot_in, connect, connect_within, kill_detached, kill_processes_in, ANSWER_PATIENCE,
};
use super::logging::sandbox_span;
use super::metrics::{CreateSource, Metrics};
use super::pidfd::PidFd;
use super::suspend::{finish_suspend, SUSPENDED, SUSPENDING};
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
    pub env: std::collections::BTreeMap<String, String>,
}

/// A running sandbox: its child, for control, and its agent, for commands.
pub struct Live {
    pub child: Mutex<ChildVm>,
    pub agent: AgentClient,
    pub pid: u32,
    pub activity: Activity,
    pub commands: Commands,
    /// Its exposed ports' forwards, while it runs.
    pub ports: super::ports::PortForwards,
}

/// The commands streaming in a sandbox, by their process id in the guest:
/// what the API's signals and stdin writes reach.
#[derive(Default)]
pub struct Commands(Mutex<HashMap<i32, Arc<RunningCommand>>>);

pub struct RunningCommand {
    pub input: sandbox::ExecInput,
    pub cmd: Vec<String>,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Its stdin takes writes through the API.
    pub stdin_open: bool,
}

impl Commands {
    /// Registered until the guard drops (when the command's stream ends).
    pub fn register(&self, pid: i32, command: RunningCommand) -> Registered<'_> {
        lock(&self.0).insert(pid, Arc::new(command));
        Registered(self, pid)
    }

    pub fn get(&self, pid: i32) -> Option<Arc<RunningCommand>> {
        lock(&self.0).get(&pid).cloned()
    }

    /// Every running command, by process id.
    pub fn list(&self) -> Vec<(i32, Arc<RunningCommand>)> {
        let mut all: Vec<_> = lock(&self.0)
            .iter()
            .map(|(pid, c)| (*pid, Arc::clone(c)))
            .collect();
        all.sort_by_key(|(pid, _)| *pid);
        all
    }
}

/// A command in [`Commands`] while it runs.
pub struct Registered<'a>(&'a Commands, i32);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&(self.0).0).remove(&self.1);
    }
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
    /// No command running, idle counted from now.
    pub(super) fn idle_from_now() -> Activity {
        Activity {
            running: Default::default(),
            last: Mutex::new(Some(std::time::Instant::now())),
        }
    }

    /// Whether nothing has run for `idle`.
    pub(super) fn idle_for(&self, idle: Duration) -> bool {
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
    pub(super) live: Mutex<HashMap<String, Arc<Live>>>,
    /// Restored sandboxes kept ready, by template (see the pool module).
    pub(super) pool: Mutex<HashMap<String, Vec<super::pool::Pooled>>>,
    /// Sandboxes (and template names) an operation is under way on.
    operations: Mutex<std::collections::HashSet<String>>,
    /// Template builds under way: VMs the host's limit counts.
    pub(super) building: Mutex<u32>,
    /// Woken after every change the event log records.
    pub changed: tokio::sync::Notify,
    pub(super) metrics: Metrics,
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
            metrics: Metrics::default(),
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
                env: spec.env.clone(),
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
        let _span = sandbox_span(&id).entered();
        let _op = self.begin(&id).map_err(CreateError::Store)?;
        self.notify();
        let started = std::time::Instant::now();
        tracing::info!(
            "creating from {}{}",
            record.source,
            if pooled.is_some() { " (warm pool)" } else { "" }
        );
        let source = match (&pooled, &spec.origin) {
            (Some(_), _) => CreateSource::Pool,
            (None, Origin::Template(_)) => CreateSource::Template,
            (None, Origin::Boot { .. }) => CreateSource::Boot,
        };
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
                self.metrics.created(source, started.elapsed());
                tracing::info!("running (capsule-vmm pid {pid})");
                Ok(record)
            }
            Err(e) => {
                let detail = format!("{e:#}");
                tracing::warn!("could not be created: {detail}");
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
    pub(super) fn watch(self: &Arc<Self>, id: &str, pid: u32) {
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
                let _span = sandbox_span(&id).entered();
                pidfd.wait();
                let status = pidfd.reap();
                // Only the VM this watcher watches: after a suspend and a
                // resume the map holds another one under the same id.
                let Some(live) = me.take_live(&id, pid) else {
                    return; // deleted or suspended: that recorded why
                };
                live.ports.close_all();
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
                tracing::warn!("ended: {detail}");
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
        tracing::warn!("lost: {detail}");
        let _ = self.store().end_sandbox(id, EndReason::Lost, detail);
        let _ = std::fs::remove_dir_all(self.dir(id));
        self.notify();
    }

    /// Ends a sandbox for `reason`: recorded first (so its watcher does
    /// not take the kill for a death), then its child is stopped and its
    /// files removed.
    pub fn destroy(&self, id: &str, reason: EndReason, detail: &str) -> Result<(), StoreError> {
        let _span = sandbox_span(id).entered();
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
            live.ports.close_all();
            lock(&live.child).kill();
        }
        let _ = std::fs::remove_dir_all(self.dir(id));
        self.notify();
        tracing::info!(
            "ended ({reason}{})",
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
            let _span = sandbox_span(id).entered();
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
            // A suspend that had not reached the store never happened; its
            // child may still be writing it, and answers once done.
            let suspending = self.dir(id).join(SUSPENDING);
            let patience = if suspending.exists() {
                BOOT_TIMEOUT
            } else {
                ANSWER_PATIENCE
            };
            let connected = connect_within(&runtime, pid, patience);
            let _ = std::fs::remove_dir_all(&suspending);
            match connected {
                Ok(live) => {
                    let pid = live.pid;
                    self.open_ports(id, &live);
                    lock(&self.live).insert(id.clone(), live);
                    self.watch(id, pid);
                    tracing::info!("adopted (capsule-vmm pid {pid})");
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
                tracing::info!("removed {name}, which no sandbox record owns");
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
                    tracing::info!("removed template {name}'s unfinished build");
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
                tracing::error!("expiry: {e}");
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

/// Why a suspend, resume, snapshot or template build did not happen.
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
