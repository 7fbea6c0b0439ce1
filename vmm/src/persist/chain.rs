//! A snapshot's files: its state and memory files, and the chain of
//! parents a diff snapshot keeps inside it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{
    Snapshot, SnapshotInfo, MAX_DIFF_CHAIN, MAX_STATE_FILE, MEMORY_FILE, PARENT_DIR, STATE_FILE,
};
use crate::error::{Error, Result};

/// One snapshot's memory in a chain: its memory file and, for a diff, the
/// pages it holds.
pub struct MemoryLayer {
    pub dir: PathBuf,
    pub file: File,
    pub dirty: Option<Vec<Vec<u64>>>,
}

/// The memory files that make up `top`'s guest memory, the full one first
/// and then each diff in the order taken: `dir` and the `parent`
/// directories nested in it. Every snapshot in the chain must describe
/// the same memory layout and be the one its child was taken against.
pub fn memory_chain(dir: &Path, top: &Snapshot) -> Result<Vec<MemoryLayer>> {
    let mut chain = vec![MemoryLayer {
        dir: dir.to_path_buf(),
        file: open_memory_file(dir, &top.info)?,
        dirty: top.dirty.clone(),
    }];
    let mut parent = top.info.parent;
    let mut at = dir.to_path_buf();
    while let Some(parent_id) = parent {
        if chain.len() > MAX_DIFF_CHAIN {
            return Err(Error::Snapshot(format!(
                "{}: more than {MAX_DIFF_CHAIN} diff snapshots deep",
                dir.display()
            )));
        }
        let parent_dir = at.join(PARENT_DIR);
        check_plain_dir(&parent_dir)?;
        let (path, bytes) = read_state_file(&parent_dir)?;
        let snap = Snapshot::from_bytes(&path, &bytes)?;
        if snap.info.id != parent_id {
            return Err(Error::Snapshot(format!(
                "{}: its parent {} is not the snapshot it was taken against",
                at.display(),
                parent_dir.display()
            )));
        }
        if snap.info.regions != top.info.regions {
            return Err(Error::Snapshot(format!(
                "{}: its parent {} has a different memory layout",
                at.display(),
                parent_dir.display()
            )));
        }
        chain.push(MemoryLayer {
            file: open_memory_file(&parent_dir, &snap.info)?,
            dir: parent_dir.clone(),
            dirty: snap.dirty,
        });
        parent = snap.info.parent;
        at = parent_dir;
    }
    chain.reverse();
    Ok(chain)
}

/// A snapshot's own subdirectory must be just that, not a link to
/// somewhere else.
fn check_plain_dir(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(Error::Snapshot(format!(
            "{} is not a directory (a diff keeps its parent there)",
            path.display()
        ))),
        Err(source) => Err(Error::File {
            what: "the parent of a diff snapshot",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Puts the snapshot in `parent` (and its own parents) into `into`, which
/// must not exist: hard links, or sparse copies across filesystems. A diff
/// snapshot then holds everything it needs.
pub fn keep_parent(parent: &Path, into: &Path) -> Result<()> {
    let mut from = parent.to_path_buf();
    let mut to = into.to_path_buf();
    for _ in 0..=MAX_DIFF_CHAIN {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&to)?;
        }
        for name in [STATE_FILE, MEMORY_FILE] {
            link_or_copy(&from.join(name), &to.join(name))?;
        }
        let next = from.join(PARENT_DIR);
        if !next.exists() {
            return Ok(());
        }
        to = to.join(PARENT_DIR);
        from = next;
    }
    Err(Error::Snapshot(format!(
        "{}: more than {MAX_DIFF_CHAIN} diff snapshots deep",
        parent.display()
    )))
}

/// Gives the file `src` a second name `dst`: a hard link, or a copy that
/// keeps its holes where links cannot go.
fn link_or_copy(src: &Path, dst: &Path) -> Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e.into()),
        Err(_) => {}
    }
    let from = open_own(src, "snapshot file")?;
    let to = crate::private::create_file(dst, false)?;
    snapshot::memory::copy_sparse(&from, &to).map_err(Error::Io)?;
    to.sync_data()?;
    Ok(())
}

/// Opens a file of a snapshot directory: a regular file, never a link.
fn open_own(path: &Path, what: &'static str) -> Result<File> {
    devices::disk::open_regular(path, false).map_err(|source| Error::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `<dir>/state`, refusing anything too big to be ours.
pub fn read_state_file(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let path = dir.join(STATE_FILE);
    let file = open_own(&path, "snapshot state")?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::File {
            what: "snapshot state",
            path: path.clone(),
            source,
        })?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(Error::Snapshot(format!(
            "{}: larger than {} MiB, not a Capsule state file",
            path.display(),
            MAX_STATE_FILE >> 20
        )));
    }
    Ok((path, bytes))
}

/// Opens `<dir>/memory` and checks it holds every region: mapping a file
/// shorter than the guest's RAM would turn the guest's first touch past
/// its end into SIGBUS in the VMM.
pub fn open_memory_file(dir: &Path, info: &SnapshotInfo) -> Result<File> {
    let path = dir.join(MEMORY_FILE);
    let file = open_own(&path, "snapshot memory")?;
    let len = file.metadata()?.len();
    let needed = info.memory_mib << 20;
    if len != needed {
        return Err(Error::Snapshot(format!(
            "{}: {len} bytes where the guest has {needed}",
            path.display()
        )));
    }
    Ok(file)
}
