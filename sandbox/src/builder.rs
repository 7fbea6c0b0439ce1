//! What a sandbox boots with: a VM configuration plus the agent's words
//! on the kernel command line.

use vmm::{DiskConfig, FlushPolicy, HostFile, VmConfig, VmSettings};

use crate::error::{Error, Result};
use crate::guest::{valid_hostname, GuestInfo};
use crate::sandbox::Sandbox;

/// Builds a [`Sandbox`].
pub struct SandboxBuilder {
    config: VmConfig,
    root: Option<DiskConfig>,
    hostname: String,
    flush: FlushPolicy,
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        SandboxBuilder {
            config: VmConfig::default(),
            root: None,
            hostname: "capsule".into(),
            flush: FlushPolicy::default(),
        }
    }
}

impl VmSettings for SandboxBuilder {
    fn vm_config_mut(&mut self) -> &mut VmConfig {
        &mut self.config
    }
}

/// What a sandbox adds to the machine's settings ([`VmSettings`]).
impl SandboxBuilder {
    /// Attaches `file` as `/dev/vda` and makes it the root filesystem
    /// (disks from [`VmSettings::disk`] come after it).
    pub fn rootfs(mut self, file: impl Into<HostFile>, read_only: bool) -> Self {
        self.root = Some(DiskConfig {
            file: file.into(),
            read_only,
            flush: FlushPolicy::default(),
        });
        self
    }
    /// What the guest's flushes do, on every disk (see [`FlushPolicy`]).
    pub fn flush(mut self, policy: FlushPolicy) -> Self {
        self.flush = policy;
        self
    }
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = name.into();
        self
    }

    /// The VM configuration the sandbox boots with.
    pub fn vm_config(&self) -> Result<VmConfig> {
        if !valid_hostname(&self.hostname) {
            return Err(Error::Config(format!(
                "invalid hostname {:?}: use letters, digits, '-' and '.', at most 64",
                self.hostname
            )));
        }
        if self.config.initramfs.is_none() {
            return Err(Error::Config(
                "an initramfs holding the guest agent is required".into(),
            ));
        }
        let mut config = self.config.clone();
        // The agent's words first: the caller's may add to them.
        let mut words = vec![format!("capsule.hostname={}", self.hostname)];
        if let Some(root) = &self.root {
            config.disks.insert(0, root.clone());
            words.push("capsule.root=/dev/vda".into());
            if root.read_only {
                words.push("capsule.ro".into());
            }
        }
        for disk in &mut config.disks {
            disk.flush = self.flush;
        }
        words.append(&mut config.cmdline);
        config.cmdline = words;
        // Held until the ready socket listens.
        config.start_paused = true;
        Ok(config)
    }

    /// What the sandbox will know of its guest.
    pub fn guest_info(&self) -> GuestInfo {
        GuestInfo {
            hostname: self.hostname.clone(),
            agent_ready: false,
            root_on_disk: self.root.is_some(),
        }
    }

    /// Boots the VM in this process; the agent's ready signal is awaited
    /// with [`Sandbox::wait_ready`].
    pub fn boot(self) -> Result<Sandbox> {
        let config = self.vm_config()?;
        let vm = vmm::VmBuilder::from(config).boot()?;
        Sandbox::adopt_booted(vm, self.guest_info())
    }
}
