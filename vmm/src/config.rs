//! What a VM is made of, and how a snapshot is brought back: plain data,
//! checked before anything is built from it.

use std::path::PathBuf;

pub use devices::virtio::block::FlushPolicy;
pub use devices::HostFile;

use crate::error::{Error, Result};
use crate::layout::{MAX_MEMORY_MIB, MAX_VCPUS};

/// A disk attached as virtio-blk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub file: HostFile,
    pub read_only: bool,
    /// What the guest's flushes do (see [`FlushPolicy`]).
    pub flush: FlushPolicy,
}

/// Everything needed to boot a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: HostFile,
    pub initramfs: Option<HostFile>,
    pub cpus: u8,
    pub memory_mib: u64,
    /// Disks in order: the first is `/dev/vda`.
    pub disks: Vec<DiskConfig>,
    /// Words added to the kernel command line, in order.
    pub cmdline: Vec<String>,
    /// Print the kernel's boot messages (slower: every byte is an exit).
    pub verbose_console: bool,
    /// Copy the console to this process's stderr.
    pub console_to_stderr: bool,
    /// Keep the console in this file (default: in the runtime directory).
    pub console_log: Option<PathBuf>,
    /// Where sockets live (default: a fresh directory under the system's
    /// temporary directory, removed when the VM is dropped).
    pub runtime_dir: Option<PathBuf>,
    /// Where the copy-on-write layer a snapshot puts over each writable
    /// disk lives (default: the runtime directory). After a snapshot the
    /// VM writes there, not to the disk it booted with: those writes are
    /// kept by a later snapshot (which links the layer into its own
    /// directory) and otherwise go when the VM does. Layers under it stay
    /// in the directories of the snapshots that froze them.
    pub layer_dir: Option<PathBuf>,
    /// Create the vCPUs but leave them stopped until [`crate::Vm::resume`],
    /// so the caller can prepare the host side first.
    pub start_paused: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: HostFile::Path(PathBuf::new()),
            initramfs: None,
            cpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            cmdline: Vec::new(),
            verbose_console: false,
            console_to_stderr: false,
            console_log: None,
            runtime_dir: None,
            layer_dir: None,
            start_paused: false,
        }
    }
}

impl VmConfig {
    /// Refuses what the VMM cannot build, with what would be accepted.
    pub fn check(&self) -> Result<()> {
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(Error::Config(format!("cpus must be 1..={MAX_VCPUS}")));
        }
        if !(32..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(Error::Config(format!(
                "memory must be 32 MiB to {} GiB, not {} MiB",
                MAX_MEMORY_MIB >> 10,
                self.memory_mib
            )));
        }
        // Each is one word of the kernel command line.
        if let Some(bad) = self
            .cmdline
            .iter()
            .find(|a| a.is_empty() || a.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::Config(format!(
                "kernel command line argument {bad:?} must be one word"
            )));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(Error::Config(format!("at most {MAX_DISKS} disks")));
        }
        Ok(())
    }
}

/// The most disks a VM may have.
pub const MAX_DISKS: usize = 16;

/// Builds a [`crate::Vm`].
#[derive(Default)]
pub struct VmBuilder {
    config: VmConfig,
}

impl From<VmConfig> for VmBuilder {
    fn from(config: VmConfig) -> Self {
        VmBuilder { config }
    }
}

/// The machine settings every builder of a VM shares: [`VmBuilder`], and
/// builders layered over it (the sandbox's) that add their own. Each sets
/// one field of the [`VmConfig`] being built.
pub trait VmSettings: Sized {
    /// The configuration being built.
    fn vm_config_mut(&mut self) -> &mut VmConfig;

    fn kernel(mut self, file: impl Into<HostFile>) -> Self {
        self.vm_config_mut().kernel = file.into();
        self
    }
    /// The initramfs (for a sandbox, the one holding the guest agent).
    fn initramfs(mut self, file: impl Into<HostFile>) -> Self {
        self.vm_config_mut().initramfs = Some(file.into());
        self
    }
    fn cpus(mut self, cpus: u8) -> Self {
        self.vm_config_mut().cpus = cpus;
        self
    }
    fn memory_mib(mut self, mib: u64) -> Self {
        self.vm_config_mut().memory_mib = mib;
        self
    }
    /// Attaches a raw disk image as the next `/dev/vdX`.
    fn disk(mut self, file: impl Into<HostFile>, read_only: bool) -> Self {
        self.vm_config_mut().disks.push(DiskConfig {
            file: file.into(),
            read_only,
            flush: FlushPolicy::default(),
        });
        self
    }
    fn cmdline_arg(mut self, arg: impl Into<String>) -> Self {
        self.vm_config_mut().cmdline.push(arg.into());
        self
    }
    fn verbose_console(mut self, on: bool) -> Self {
        self.vm_config_mut().verbose_console = on;
        self
    }
    fn console_to_stderr(mut self, on: bool) -> Self {
        self.vm_config_mut().console_to_stderr = on;
        self
    }
    fn console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.vm_config_mut().console_log = Some(path.into());
        self
    }
    fn runtime_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.vm_config_mut().runtime_dir = Some(path.into());
        self
    }
    fn layer_dir(mut self, path: impl Into<PathBuf>) -> Self {
        self.vm_config_mut().layer_dir = Some(path.into());
        self
    }
}

impl VmSettings for VmBuilder {
    fn vm_config_mut(&mut self) -> &mut VmConfig {
        &mut self.config
    }
}

impl VmBuilder {
    pub fn start_paused(mut self, paused: bool) -> Self {
        self.config.start_paused = paused;
        self
    }
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    pub fn into_config(self) -> VmConfig {
        self.config
    }

    /// Creates the VM and starts its vCPUs.
    pub fn boot(self) -> Result<crate::Vm> {
        crate::build::boot(self.config)
    }
}

/// How a restored VM's memory is backed. The default is the one that
/// restores to a first command fastest (`benches/snapshot.rs`, see
/// docs/PERFORMANCE.md): the file mapping, which also lets forks share
/// memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryBackend {
    /// A private copy-on-write mapping of the memory file: pages come from
    /// the page cache on first touch, shared by every VM restored from the
    /// same file.
    #[default]
    File,
    /// Anonymous memory filled on first touch by a userfaultfd handler
    /// thread, a chunk at a time, from the memory file. Touched pages are
    /// the VM's own (not shared with other forks). With `prefetch`, the
    /// chunks recorded in the snapshot's working set
    /// ([`crate::Vm::save_working_set`]) are copied in before the guest
    /// runs.
    Uffd { prefetch: bool },
}

/// How to restore a snapshot.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    pub memory: MemoryBackend,
    /// Where sockets live (default: a fresh temporary directory).
    pub runtime_dir: Option<PathBuf>,
    /// Keep the console in this file (default: in the runtime directory).
    pub console_log: Option<PathBuf>,
    /// Copy the console to this process's stderr.
    pub console_to_stderr: bool,
    /// Log the pages the guest writes from the start, so the restored VM's
    /// next snapshot can be a diff against this one
    /// ([`crate::Vm::snapshot_diff`]).
    pub track_dirty: bool,
    /// Where each writable disk's own copy-on-write layer over the
    /// snapshot's frozen disk goes (default: the runtime directory, so a
    /// replica's writes vanish with it).
    pub layer_dir: Option<PathBuf>,
    /// The file outside the snapshot under each device that has one (the
    /// raw image under each disk), in the order the VM had them (the
    /// first disk first). A snapshot never names a file outside its own
    /// directory, so these are named again here, and each is checked to
    /// be the file the snapshot was taken with (size and modification
    /// time).
    pub disks: Vec<HostFile>,
    /// Leave the restored vCPUs stopped until [`crate::Vm::resume`].
    pub start_paused: bool,
    /// What the restored disks do with the guest's flushes.
    pub flush: FlushPolicy,
}
