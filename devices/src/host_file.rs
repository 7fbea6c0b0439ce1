//! A host file the VMM reads or a device is built over.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Named by a path the VMM opens itself, or already open: handed over by
/// a supervisor, so the VMM needs no access to the path (a confined
/// `capsule-vmm` child has only its descriptors).
#[derive(Clone, Debug)]
pub enum HostFile {
    Path(PathBuf),
    Open { file: Arc<File>, name: PathBuf },
}

impl HostFile {
    /// An open file, called `name` in messages (and in a disk's id). Its
    /// position is the VMM's from now on: whoever handed it over uses it
    /// no more (a disk reads and writes through it).
    pub fn open_file(file: File, name: impl AsRef<Path>) -> HostFile {
        HostFile::Open {
            file: Arc::new(file),
            name: name.as_ref().to_path_buf(),
        }
    }

    /// The path, or the name the open file was given.
    pub fn name(&self) -> &Path {
        match self {
            HostFile::Path(p) => p,
            HostFile::Open { name, .. } => name,
        }
    }

    /// A descriptor to use: the path opened (for writing too if
    /// `writable`), or the open file again (as its opener opened it).
    pub fn open(&self, writable: bool) -> io::Result<File> {
        match self {
            HostFile::Path(p) => OpenOptions::new().read(true).write(writable).open(p),
            HostFile::Open { file, .. } => file.try_clone(),
        }
    }
}

impl<P: AsRef<Path>> From<P> for HostFile {
    fn from(p: P) -> Self {
        HostFile::Path(p.as_ref().to_path_buf())
    }
}
