//! Errors a VMM user can act on.

use std::path::PathBuf;

use crate::host::KvmFlavor;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or run on a machine with hardware virtualization)")]
    NoKvm,
    #[error("permission denied opening /dev/kvm: add your user to the 'kvm' group or run as root")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version mismatch or missing capability: {0}")]
    KvmCapability(String),
    #[error("KVM call failed while {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("guest kernel {path} not found (build it with `make kernel`, or pass a kernel path)")]
    KernelMissing { path: PathBuf },
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the guest kernel: {0}")]
    KernelLoad(String),
    #[error("cannot set up guest memory: {0}")]
    Memory(String),
    #[error("device setup failed: {0}")]
    Device(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Private(#[from] crate::private::PrivateError),
    #[error("the guest kernel cannot run on this host's KVM ({flavor:?}): KVM reported an emulation failure. {hint}")]
    Unsupported { flavor: KvmFlavor, hint: String },
    #[error("the VM stopped ({exit}). Last console lines:\n{console}")]
    Stopped { exit: String, console: String },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error(
        "the snapshot has {expected} disk(s) and {given} were named: a snapshot never names files \
         outside its own directory, so the raw image under each disk is named again when it is \
         restored, in the order the VM had them:{list}"
    )]
    DisksNotNamed {
        expected: usize,
        given: usize,
        list: String,
    },
    #[error("snapshot {path}: {source}")]
    SnapshotFormat {
        path: PathBuf,
        #[source]
        source: snapshot::container::FormatError,
    },
    #[error("this snapshot cannot be restored on this host: {0}")]
    SnapshotIncompatible(String),
    #[error("the VM is not running ({0})")]
    NotRunning(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }
}

/// The explanation shown when a guest fails on a PVM host.
pub const PVM_HINT: &str = "This host's /dev/kvm is PVM (kvm_pvm, software virtualization): an unmodified Linux guest kernel cannot run on it. Supply a PVM-enabled guest kernel, or run on hardware KVM (Intel VT-x or AMD-V). `make test` and `make demo` use the nested test host on such machines.";
