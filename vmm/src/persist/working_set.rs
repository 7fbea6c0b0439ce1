//! The memory a restored guest touched first, kept next to its snapshot.

use std::path::Path;

use serde::{Deserialize, Serialize};
use snapshot::container::{self, StateWriter, Tag};

use super::{decode, encode, SnapshotInfo};
use crate::error::{Error, Result};

pub const WORKING_SET_FILE: &str = "workingset";
const TAG_WORKING_SET: Tag = *b"WSET";

/// The memory chunks a restored guest touched first (see
/// `snapshot::uffd`), kept next to the snapshot so later restores can
/// copy them in before the guest runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingSet {
    pub chunk: u32,
    /// Memory-file offsets of the chunks, in first-touch order.
    pub offsets: Vec<u64>,
}

pub fn write_working_set(dir: &Path, set: &WorkingSet) -> Result<()> {
    let mut w = StateWriter::new();
    w.section(TAG_WORKING_SET, encode("working set", set)?);
    // A fresh name made with O_EXCL (never a file or link already there),
    // then renamed over the old set.
    let mut tmp = tempfile::Builder::new()
        .prefix(".workingset-")
        .tempfile_in(dir)?;
    std::io::Write::write_all(&mut tmp, &w.to_bytes())?;
    tmp.persist(dir.join(WORKING_SET_FILE))
        .map_err(|e| Error::Io(e.error))?;
    Ok(())
}

/// The snapshot's recorded working set, if it has one. A damaged one is
/// only a lost hint: it is reported and ignored.
pub fn read_working_set(dir: &Path, info: &SnapshotInfo) -> Option<WorkingSet> {
    let path = dir.join(WORKING_SET_FILE);
    let bytes = std::fs::read(&path).ok()?;
    let parsed = container::parse(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|sections| match sections.as_slice() {
            [s] if s.tag == TAG_WORKING_SET => {
                decode::<WorkingSet>(&path, "working set", s.payload).map_err(|e| e.to_string())
            }
            _ => Err("unexpected sections".into()),
        })
        .and_then(|set| {
            let chunks = (info.memory_mib << 20) / u64::from(set.chunk.max(1));
            if set.chunk == 0 || set.chunk % 4096 != 0 || set.offsets.len() as u64 > chunks {
                Err("inconsistent chunk size or count".into())
            } else {
                Ok(set)
            }
        });
    match parsed {
        Ok(set) => Some(set),
        Err(e) => {
            log::warn!("ignoring the working set {}: {e}", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::container;

    /// A shipped snapshot directory can hold links where the working set
    /// (or its temporary file) goes: writing it replaces the link and
    /// never writes through it.
    #[test]
    fn writing_a_working_set_never_follows_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("bashrc");
        std::fs::write(&precious, b"precious").unwrap();
        for name in ["workingset.tmp", WORKING_SET_FILE] {
            std::os::unix::fs::symlink(&precious, dir.path().join(name)).unwrap();
        }
        let set = WorkingSet {
            chunk: 65536,
            offsets: vec![0, 65536],
        };
        write_working_set(dir.path(), &set).unwrap();
        assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
        let written = dir.path().join(WORKING_SET_FILE);
        let meta = std::fs::symlink_metadata(&written).unwrap();
        assert!(meta.is_file(), "the link was replaced by the file");
        let bytes = std::fs::read(&written).unwrap();
        let sections = container::parse(&bytes).unwrap();
        assert_eq!(sections.len(), 1);
        assert_eq!(sections[0].tag, TAG_WORKING_SET);
    }
}
