//! A directory for the VM's sockets and logs.

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Removed on drop if the VMM made it.
pub(crate) struct RuntimeDir {
    pub path: PathBuf,
    owned: bool,
}

impl RuntimeDir {
    /// `requested` (made private if missing, refused if not ours), or a
    /// fresh private directory under the system's temporary directory.
    pub fn new(requested: Option<&Path>) -> Result<Self> {
        if let Some(p) = requested {
            crate::private::ensure_private_dir(p)?;
            return Ok(RuntimeDir {
                path: p.to_path_buf(),
                owned: false,
            });
        }
        Ok(RuntimeDir {
            path: crate::private::temp_dir("capsule-")?,
            owned: true,
        })
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
