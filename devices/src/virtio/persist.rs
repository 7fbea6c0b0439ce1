//! Saving a virtio device into a snapshot and building it again.
//!
//! Each device implements [`Persist`] next to its runtime code (its
//! folder's `persist.rs`) and encodes its own state; a snapshot keeps that
//! as a [`SavedDevice`], opaque to the VMM. [`restore`] is the one place
//! that knows every kind of device: adding one is a line there.
//!
//! A saved state comes from a file, so it is untrusted: each device
//! checks what it decodes before anything is opened or built from it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use virtio_bindings::virtio_ids::{VIRTIO_ID_BLOCK, VIRTIO_ID_RNG, VIRTIO_ID_VSOCK};

use super::VirtioDevice;

/// What a snapshot keeps of one virtio device (its transport's state is
/// kept beside it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// The virtio device id (`virtio_ids`).
    pub kind: u32,
    /// The device's own state, encoded by the device.
    pub state: Vec<u8>,
    /// A file outside the snapshot the device is built over (a disk's raw
    /// image): never opened by name from the snapshot, but named again by
    /// whoever restores it and checked to be this one.
    pub external: Option<ExternalFile>,
}

/// A file outside the snapshot, as it was when the snapshot was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalFile {
    /// Its file name then: for messages only, never opened.
    pub name: String,
    pub size: u64,
    /// Modification time, nanoseconds since the epoch
    /// ([`crate::disk::fingerprint`]).
    pub mtime_ns: u64,
}

/// The longest name an [`ExternalFile`] may carry.
pub const EXTERNAL_NAME_MAX: usize = 255;

/// What saving a device may use. The VM is paused and its devices idle.
pub struct SaveContext<'a> {
    /// The snapshot directory being written: a device keeps its files
    /// there under names of its own.
    pub snapshot_dir: &'a Path,
    /// Where a device puts files it writes after the snapshot (a disk's
    /// new copy-on-write layer).
    pub work_dir: &'a Path,
    /// The device's position among the VM's devices of its kind.
    pub index: usize,
}

/// What building a device again may use.
pub struct RestoreContext<'a> {
    /// The snapshot directory, holding the device's own files.
    pub snapshot_dir: &'a Path,
    /// Where a device puts files it writes from now on.
    pub work_dir: &'a Path,
    /// The device's position among the snapshot's devices of its kind.
    pub index: usize,
    /// The file named for the device's [`SavedDevice::external`].
    pub external: Option<&'a crate::HostFile>,
    /// Where the vsock device's host side listens.
    pub vsock_path: &'a Path,
    /// What a restored disk does with the guest's flushes (host policy,
    /// not kept in the snapshot).
    pub flush: super::block::FlushPolicy,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("unknown device kind {0}")]
    UnknownKind(u32),
    #[error("the {what} state is malformed: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {}: {source}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A device that can be kept in a snapshot and built again from it.
pub trait Persist {
    /// Records the device for a snapshot being written into
    /// `ctx.snapshot_dir`. A device may move its host side (a disk
    /// freezes its image and carries on in a new layer) but never changes
    /// what the guest sees.
    fn save(&mut self, ctx: &SaveContext) -> Result<SavedDevice, PersistError>;
}

/// Encodes a device's own state for [`SavedDevice::state`].
pub fn encode<T: Serialize>(what: &'static str, state: &T) -> Result<Vec<u8>, PersistError> {
    postcard::to_stdvec(state).map_err(|e| PersistError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// Decodes a device's own state: all of it, nothing left over.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, PersistError> {
    let malformed = |reason: String| PersistError::Malformed { what, reason };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(malformed(format!("{} stray bytes", rest.len())));
    }
    Ok(value)
}

/// A device as the VMM holds it: configured by its transport, served by
/// the event loop.
pub type SharedDevice = Arc<Mutex<dyn VirtioDevice>>;

/// Builds the device `saved` describes, checking its state first. Nothing
/// is attached to a VM yet: a restore builds every device before it
/// creates one.
pub fn restore(saved: &SavedDevice, ctx: &RestoreContext) -> Result<SharedDevice, PersistError> {
    Ok(match saved.kind {
        VIRTIO_ID_BLOCK => Arc::new(Mutex::new(super::block::Block::restore(saved, ctx)?)),
        VIRTIO_ID_RNG => Arc::new(Mutex::new(super::rng::Rng::restore(saved, ctx)?)),
        VIRTIO_ID_VSOCK => Arc::new(Mutex::new(super::vsock::Vsock::restore(saved, ctx)?)),
        other => return Err(PersistError::UnknownKind(other)),
    })
}
