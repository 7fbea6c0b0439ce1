//! The control protocol between a supervisor and its `capsule-vmm` child.
//!
//! One message per SOCK_SEQPACKET packet, JSON, at most [`MAX_MESSAGE`]
//! bytes, with up to [`MAX_FDS`] descriptors attached (SCM_RIGHTS). The
//! child speaks first: a [`FromChild::Hello`] naming its protocol
//! version. Every request carries an id its reply repeats; events come
//! unasked, in order, to every connection. Messages are untrusted in both
//! directions: each side checks what it reads, and a malformed message
//! gets an error reply, never a crash.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The version this build speaks; a peer on another one is refused with
/// both versions named.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 256 << 10;
/// Most descriptors attached to one message.
pub const MAX_FDS: usize = 32;
/// The control socket a child listens on in its runtime directory, for
/// supervisors that come later (a kept sandbox's CLI, a restarted daemon).
pub const CONTROL_SOCKET: &str = "control.sock";
/// The vsock device's socket in the runtime directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The guest console's log in the runtime directory.
pub const CONSOLE_LOG: &str = "console.log";

/// A request to the child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Boots a new VM, left paused. Descriptors: the kernel, the
    /// initramfs if `initramfs`, then each disk in order.
    Boot(BootSpec),
    /// Restores the snapshot in `snapshot`, left paused. Descriptors: the
    /// raw image under each of its disks, in order.
    Restore(RestoreSpec),
    Resume,
    Pause,
    /// Writes a snapshot into `dir` (new or empty).
    Snapshot {
        dir: PathBuf,
        diff: bool,
    },
    /// Bytes kept with the VM's later snapshots, as hex.
    SetAnnotation {
        hex: String,
    },
    Info,
    /// The console's last lines.
    ConsoleTail {
        lines: u32,
    },
    /// What the VM is doing, for one that stopped answering.
    StallReport,
    /// Stops the VM now; the child exits after the `exited` event.
    Kill,
}

/// What a VM boots with. Files come as descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    pub cpus: u8,
    pub memory_mib: u64,
    /// Whether an initramfs descriptor follows the kernel's.
    pub initramfs: bool,
    /// One per disk descriptor, in order.
    pub disks: Vec<DiskSpec>,
    pub cmdline: Vec<String>,
    pub verbose_console: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The image's name, for messages and the disk's id.
    pub name: PathBuf,
    pub read_only: bool,
    #[serde(default)]
    pub flush: vmm::FlushPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    pub snapshot: PathBuf,
    /// The name of each disk descriptor, in order.
    pub disks: Vec<PathBuf>,
    /// Log guest writes from the start, so the next snapshot can be a
    /// diff against this one.
    pub track_dirty: bool,
    pub memory: MemorySpec,
    /// What the restored disks do with the guest's flushes.
    #[serde(default)]
    pub flush: vmm::FlushPolicy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemorySpec {
    #[default]
    File,
    Uffd {
        prefetch: bool,
    },
}

/// A message from the child.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromChild {
    Hello {
        protocol: u32,
        pid: u32,
        software: String,
    },
    Reply {
        id: u64,
        result: Result<Answer, Failure>,
    },
    Event {
        event: Event,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    Done,
    /// The VM is built (paused).
    Built {
        /// The annotation a restored VM's snapshot carried, as hex.
        annotation_hex: String,
        /// Where a restore's time went: (phase, milliseconds).
        timings: Vec<(String, f64)>,
    },
    Snapshot {
        memory_bytes_written: u64,
        memory_zero_bytes: u64,
        paused_ms: f64,
        /// The files outside the snapshot a restore names again.
        external_files: Vec<PathBuf>,
    },
    Info(Info),
    Text {
        text: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub pid: u32,
    /// None until a VM is built.
    pub state: Option<VmState>,
    pub annotation_hex: String,
    pub external_files: Vec<PathBuf>,
    pub cpus: u8,
    pub memory_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    Exited,
}

/// Why a request failed: a stable code and a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: FailureCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The request could not be read or does not fit the protocol.
    BadRequest,
    /// Not now: no VM yet, one already built, or it has ended.
    WrongState,
    /// The VMM refused or failed (its message says why).
    Vmm,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The VM is built (paused until resumed).
    Ready,
    Paused,
    Resumed,
    SnapshotWritten {
        dir: PathBuf,
    },
    /// The VM ended; the child exits after this.
    Exited {
        reason: ExitReason,
    },
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", content = "message", rename_all = "snake_case")]
pub enum ExitReason {
    GuestReset,
    GuestPowerOff,
    Stopped,
    Unsupported(String),
    Error(String),
}

impl From<vmm::VmExit> for ExitReason {
    fn from(exit: vmm::VmExit) -> Self {
        match exit {
            vmm::VmExit::GuestReset => ExitReason::GuestReset,
            vmm::VmExit::GuestPowerOff => ExitReason::GuestPowerOff,
            vmm::VmExit::Stopped => ExitReason::Stopped,
            vmm::VmExit::Unsupported(m) => ExitReason::Unsupported(m),
            vmm::VmExit::Error(m) => ExitReason::Error(m),
        }
    }
}

impl From<ExitReason> for vmm::VmExit {
    fn from(reason: ExitReason) -> Self {
        match reason {
            ExitReason::GuestReset => vmm::VmExit::GuestReset,
            ExitReason::GuestPowerOff => vmm::VmExit::GuestPowerOff,
            ExitReason::Stopped => vmm::VmExit::Stopped,
            ExitReason::Unsupported(m) => vmm::VmExit::Unsupported(m),
            ExitReason::Error(m) => vmm::VmExit::Error(m),
        }
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) || !hex.is_ascii() {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}
