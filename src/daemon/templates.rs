//! Templates: primed snapshots that sandboxes are restored from.
//!
//! ```text
//! $CAPSULE_HOME/daemon/templates/<name>/
//!     snapshot/     the VM's state, memory and frozen disk layers
//!     rootfs.ext4   the raw image under its root disk (never written again)
//! ```
//!
//! A template is built by booting, running a command and snapshotting
//! (`POST /v1/templates`), or taken from a running sandbox, which carries
//! on (`POST /v1/sandboxes/{id}/snapshot`). It is recorded only once its
//! files are whole. A sandbox made from one hard-links the raw image into
//! its own directory, so deleting the template never breaks its sandboxes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use sandbox::{ChildVm, ExecRequest, Machine};

use super::child::{boot_in, child_options, connect_restored, ROOTFS};
use super::logging::{sandbox_span, template_span};
use super::supervisor::{LifecycleError, Live, Supervisor, BOOT_TIMEOUT};
use crate::store::{SandboxState, StoreError, TemplateRecord};

const SNAPSHOT: &str = "snapshot";
/// The most output kept from a template's priming command (for its error).
const COMMAND_OUTPUT: usize = 1 << 20;

/// What to build a template from.
#[derive(Clone, Debug)]
pub struct TemplateSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: Option<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u32,
    /// Run once it is ready, before the snapshot; it must exit 0.
    pub cmd: Vec<String>,
    pub timeout: Duration,
}

/// Links `from` at `to`, or copies it where a link cannot be made,
/// keeping its modification time (a restore checks it).
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)?;
    let modified = std::fs::metadata(from)?.modified()?;
    std::fs::File::options()
        .write(true)
        .open(to)?
        .set_modified(modified)
}

impl Supervisor {
    fn template_dir(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(name)
    }

    /// A directory for a new template, or a conflict if the name is taken.
    fn new_template_dir(&self, name: &str) -> Result<PathBuf, LifecycleError> {
        if self.store().template_exists(name)? {
            return Err(StoreError::Conflict(format!("template {name:?} already exists")).into());
        }
        let fail = |e: anyhow::Error| LifecycleError::Failed(format!("{e:#}"));
        vmm::private::ensure_private_dir(&self.root.join("templates"))
            .map_err(|e| fail(e.into()))?;
        let dir = self.template_dir(name);
        // Left by a build that did not finish: never recorded, so unused.
        let _ = std::fs::remove_dir_all(&dir);
        vmm::private::ensure_private_dir(&dir).map_err(|e| fail(e.into()))?;
        Ok(dir)
    }

    /// Boots `spec`, runs its command, snapshots and stops it. Blocks.
    pub fn build_template(
        &self,
        name: &str,
        spec: &TemplateSpec,
    ) -> Result<TemplateRecord, LifecycleError> {
        // One operation per name at a time, and a build runs a VM: it
        // counts against the host's limit.
        let _span = template_span(name).entered();
        let _op = self.begin(&format!("template:{name}"))?;
        let _room = self.host_room()?;
        tracing::info!("building");
        let dir = self.new_template_dir(name)?;
        match build(&dir, spec) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(LifecycleError::Failed(format!("template {name}: {e:#}")));
            }
        }
        let record = TemplateRecord {
            name: name.to_string(),
            kind: "template".into(),
            cpus: u32::from(spec.cpus),
            memory_mib: spec.memory_mib,
            has_rootfs: spec.rootfs.is_some(),
            source: serde_json::json!({ "rootfs": spec.rootfs, "cmd": spec.cmd }),
            created_at: 0,
        };
        self.record_template(&dir, record)
    }

    fn record_template(
        &self,
        dir: &Path,
        record: TemplateRecord,
    ) -> Result<TemplateRecord, LifecycleError> {
        let name = record.name.clone();
        if let Err(e) = self.store().insert_template(&record) {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e.into());
        }
        tracing::info!("ready");
        Ok(self.store().template(&name)?)
    }

    /// Snapshots a running sandbox into a template named `name`; the
    /// sandbox carries on. Blocks.
    pub fn snapshot_sandbox(&self, id: &str, name: &str) -> Result<TemplateRecord, LifecycleError> {
        let _span = sandbox_span(id).entered();
        let _template = template_span(name).entered();
        let _op = self.begin(&format!("template:{name}"))?;
        let _sandbox_op = self.begin(id)?;
        let record = self.store().sandbox(id)?;
        let live = match (record.state, self.live(id)) {
            (SandboxState::Running, Some(live)) => live,
            (s, _) => {
                return Err(
                    StoreError::Conflict(format!("sandbox {id} is {s}, not running")).into(),
                )
            }
        };
        let dir = self.new_template_dir(name)?;
        let taken = snapshot_into(&live, &dir, &self.dir(id));
        if let Err(e) = taken {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(LifecycleError::Failed(format!("snapshot of {id}: {e:#}")));
        }
        let has_rootfs = dir.join(ROOTFS).exists();
        self.record_template(
            &dir,
            TemplateRecord {
                name: name.to_string(),
                kind: "snapshot".into(),
                cpus: record.cpus,
                memory_mib: record.memory_mib,
                has_rootfs,
                source: serde_json::json!({ "sandbox": id }),
                created_at: 0,
            },
        )
    }

    pub fn delete_template(&self, name: &str) -> Result<(), StoreError> {
        self.store().delete_template(name)?;
        // Its pool went with it in the store; its ready sandboxes go now.
        self.trim_pools();
        let _ = std::fs::remove_dir_all(self.template_dir(name));
        Ok(())
    }

    /// The VM of new sandbox `id`, restored from template `name` with an
    /// identity of its own (its id as its hostname).
    pub(super) fn restore_template(&self, id: &str, name: &str) -> Result<Arc<Live>> {
        let template = self.store().template(name)?;
        let from = self.template_dir(name);
        let dir = self.dir(id);
        vmm::private::ensure_private_dir(&dir)?;
        let mut disks = Vec::new();
        if template.has_rootfs {
            let own = dir.join(ROOTFS);
            link_or_copy(&from.join(ROOTFS), &own)
                .with_context(|| format!("taking template {name}'s root filesystem"))?;
            disks.push(own.into());
        }
        let options = sandbox::RestoreOptions {
            vm: vmm::RestoreOptions {
                disks,
                ..Default::default()
            },
            identity: sandbox::fork_identity(id)?,
            timeout: Some(BOOT_TIMEOUT),
        };
        let sb = ChildVm::restore(&from.join(SNAPSHOT), &options, child_options(&dir)?)
            .with_context(|| format!("restoring template {name}"))?;
        connect_restored(sb, &dir.join("runtime"))
    }
}

/// Builds a template's files in `dir`.
fn build(dir: &Path, spec: &TemplateSpec) -> Result<()> {
    let mut sb = boot_in(
        dir,
        &spec.kernel,
        &spec.initramfs,
        spec.rootfs.as_deref(),
        spec.cpus,
        spec.memory_mib,
    )?;
    let built = (|| -> Result<()> {
        sb.wait_ready(BOOT_TIMEOUT)?;
        if !spec.cmd.is_empty() {
            let request = ExecRequest {
                argv: spec.cmd.clone(),
                timeout_ms: Some(spec.timeout.as_millis() as u64),
                ..Default::default()
            };
            let out = sb
                .agent()?
                .exec(request)?
                .output_with_limit(COMMAND_OUTPUT)?;
            if out.status.code != Some(0) {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let tail: String = stderr
                    .chars()
                    .rev()
                    .take(2000)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!("its command ended with {:?}: {tail}", out.status);
            }
        }
        sb.snapshot(dir.join(SNAPSHOT))?;
        Ok(())
    })();
    sb.kill();
    // The runtime directory held the layer the VM wrote after the
    // snapshot: not part of the template.
    let _ = std::fs::remove_dir_all(dir.join("runtime"));
    built
}

/// Snapshots a live sandbox (whose own directory is `sandbox_dir`) into
/// `dir`, with a link to the raw image under its root disk.
fn snapshot_into(live: &Live, dir: &Path, sandbox_dir: &Path) -> Result<()> {
    let stats = super::supervisor::lock(&live.child).snapshot(&dir.join(SNAPSHOT), false)?;
    tracing::debug!(
        "snapshot: {} bytes of memory written",
        stats.memory_bytes_written
    );
    let rootfs = sandbox_dir.join(ROOTFS);
    if rootfs.exists() {
        // Frozen by this snapshot (or an earlier one): its writes are in
        // layers now, so the image itself never changes again.
        link_or_copy(&rootfs, &dir.join(ROOTFS))
            .map_err(|e| anyhow!("keeping the root filesystem: {e}"))?;
    }
    Ok(())
}
