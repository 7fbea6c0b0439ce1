//! A disk in a snapshot: frozen where it is, its layers kept in the
//! snapshot directory by name, its raw image named again at restore.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::Block;
use crate::disk::{DiskImage, MAX_DEPTH};
use crate::virtio::persist::{
    decode, encode, ExternalFile, Persist, PersistError, RestoreContext, SaveContext, SavedDevice,
    EXTERNAL_NAME_MAX,
};

/// The name a snapshot gives layer `j` (from the bottom) of disk `disk`.
pub fn layer_name(disk: usize, j: usize) -> String {
    format!("disk{disk}.{j}.layer")
}

/// What a snapshot records of a disk; its raw image is the saved
/// device's [`SavedDevice::external`] file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub read_only: bool,
    pub capacity_sectors: u64,
    /// Layer files in the snapshot directory, bottom first, by name
    /// ([`layer_name`]).
    pub layers: Vec<String>,
}

impl BlockState {
    /// Only what this VMM writes: a few layers, each with exactly the name
    /// it gives them (never a path, never another file of the directory).
    fn check(&self, index: usize) -> Result<(), PersistError> {
        if self.layers.len() > MAX_DEPTH {
            return Err(PersistError::Invalid(format!(
                "disk {index} has {} layers",
                self.layers.len()
            )));
        }
        for (j, name) in self.layers.iter().enumerate() {
            if *name != layer_name(index, j) {
                return Err(PersistError::Invalid(format!(
                    "disk {index} names {name:?} as a layer: a snapshot names only its own layer \
                     files (disk{index}.{j}.layer)"
                )));
            }
        }
        Ok(())
    }
}

/// Puts a new copy-on-write layer over `disk` in `dir`, under a name
/// unique among the VMs of every process sharing the directory (the file
/// is created new, never replaced).
fn push_new_layer(disk: &mut DiskImage, dir: &Path, index: usize) -> Result<(), PersistError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seq = COUNTER.fetch_add(1, Ordering::Relaxed);
    let top = dir.join(format!("disk{index}-{}-{seq}.layer", std::process::id()));
    disk.push_layer(&top).map_err(|source| PersistError::File {
        what: "creating the disk layer",
        path: top,
        source,
    })
}

impl Persist for Block {
    /// Freezes a writable disk as it is now, carrying on in a new
    /// copy-on-write layer in the work directory (nothing writes the
    /// frozen files any more), and keeps every frozen layer in the
    /// snapshot directory.
    fn save(&mut self, ctx: &SaveContext) -> Result<SavedDevice, PersistError> {
        let i = ctx.index;
        let depth = self.disk.depth();
        if !self.read_only {
            if depth >= MAX_DEPTH {
                return Err(PersistError::Invalid(format!(
                    "disk {i} is already {depth} layers deep, the most a restore opens"
                )));
            }
            push_new_layer(&mut self.disk, ctx.work_dir, i)?;
        }
        let layers = self
            .disk
            .keep_layers_in(ctx.snapshot_dir, !self.read_only, &|j| layer_name(i, j))?;
        let name = self
            .disk
            .raw_base()
            .path()
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let (size, mtime_ns) = self.disk.raw_fingerprint()?;
        let state = BlockState {
            read_only: self.read_only,
            capacity_sectors: self.capacity_sectors,
            layers,
        };
        Ok(SavedDevice {
            kind: VIRTIO_ID_BLOCK,
            state: encode("disk", &state)?,
            external: Some(ExternalFile {
                name: name.chars().take(EXTERNAL_NAME_MAX).collect(),
                size,
                mtime_ns,
            }),
        })
    }
}

impl Block {
    /// The disk again, as the snapshot froze it: its layers from the
    /// snapshot directory over the raw image the caller named (checked to
    /// be the one it was taken with), and for a writable disk a new layer
    /// of its own in the work directory, so the snapshot stays as it is.
    pub fn restore(saved: &SavedDevice, ctx: &RestoreContext) -> Result<Block, PersistError> {
        let i = ctx.index;
        let state: BlockState = decode("disk", &saved.state)?;
        state.check(i)?;
        let (Some(recorded), Some(base)) = (&saved.external, ctx.external) else {
            return Err(PersistError::Invalid(format!(
                "disk {i} has no raw image under it"
            )));
        };
        let file_error = |source| PersistError::File {
            what: "the disk image",
            path: base.name().to_path_buf(),
            source,
        };
        let raw = base
            .open(false)
            .and_then(|file| DiskImage::raw(file, base.name()))
            .map_err(file_error)?;
        let now = raw.raw_fingerprint().map_err(file_error)?;
        if now != (recorded.size, recorded.mtime_ns) {
            return Err(PersistError::Invalid(format!(
                "{} is not the image the snapshot was taken with ({:?}, {} bytes): it is another \
                 file, or it changed since",
                base.name().display(),
                recorded.name,
                recorded.size
            )));
        }
        let layers: Vec<PathBuf> = state
            .layers
            .iter()
            .map(|name| ctx.snapshot_dir.join(name))
            .collect();
        let image = DiskImage::open_chain_over(raw, &layers, false).map_err(|source| {
            PersistError::Invalid(format!("disk {i}: opening its layers: {source}"))
        })?;
        let mut block = Block::from_image(image, true)
            .map_err(|e| PersistError::Invalid(format!("disk {i}: {e}")))?;
        if block.capacity_sectors != state.capacity_sectors {
            return Err(PersistError::Invalid(format!(
                "disk {i} has {} sectors, the snapshot {}",
                block.capacity_sectors, state.capacity_sectors
            )));
        }
        if !state.read_only {
            push_new_layer(&mut block.disk, ctx.work_dir, i)?;
            block.read_only = false;
        }
        block.flush = ctx.flush;
        Ok(block)
    }
}
