//! State on disk that only the user running the VMM may read or change:
//! runtime directories (sockets that reach the guest), consoles and logs
//! (what the guest printed), snapshots. Directories are 0700 and must be
//! owned by this user and writable by nobody else; a directory someone
//! else prepared (say, in a shared /tmp) is refused, never used. Files are
//! 0600 and never opened through a symlink.

use std::fs::File;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a directory cannot hold private state.
#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} is a symbolic link: refusing to keep private state through it (point at the directory itself)")]
    Symlink(PathBuf),
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "{path} belongs to uid {owner}, not to you (uid {us}): refusing to keep private state \
         there (someone else may have made it to watch or hijack your sandboxes); remove it or \
         choose another directory"
    )]
    ForeignOwner { path: PathBuf, owner: u32, us: u32 },
    #[error(
        "{path} is writable by others (mode {mode:o}): refusing to keep private state there; \
         `chmod 700` it or choose another directory"
    )]
    Writable { path: PathBuf, mode: u32 },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> PrivateError + '_ {
    move |source| PrivateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Makes `path` (and any missing parents) 0700 if it does not exist, then
/// checks it is a private directory of this user.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateError> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
    {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error(path)(e)),
    }
    check_private_dir(path)
}

/// Checks `path` is a directory (not a symlink to one), owned by this
/// user, and not writable by group or others.
pub fn check_private_dir(path: &Path) -> Result<(), PrivateError> {
    let meta = std::fs::symlink_metadata(path).map_err(io_error(path))?;
    if meta.file_type().is_symlink() {
        return Err(PrivateError::Symlink(path.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(PrivateError::NotADirectory(path.to_path_buf()));
    }
    let us = nix::unistd::Uid::effective().as_raw();
    if meta.uid() != us {
        return Err(PrivateError::ForeignOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            us,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(PrivateError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Opens `path` for writing, 0600, never through a symlink: truncated if
/// `truncate`, otherwise it must not exist yet.
pub fn create_file(path: &Path, truncate: bool) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if truncate {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path)?;
    // An older file of ours may have had a looser mode.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Starts a log file at `path` afresh (0600, never through a symlink),
/// opened for appending: it can be truncated under a writer that keeps
/// writing, which then carries on at the start.
pub fn create_log(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_APPEND)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// A new directory with an unpredictable name under the system's
/// temporary directory, 0700.
pub fn temp_dir(prefix: &str) -> io::Result<PathBuf> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()?
        .keep())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_dirs_are_made_and_checked() {
        let base = tempfile::tempdir().unwrap();
        let home = base.path().join("a/b/home");
        ensure_private_dir(&home).unwrap();
        let mode = std::fs::metadata(&home).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        ensure_private_dir(&home).unwrap();

        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&home).unwrap_err();
        assert!(matches!(e, PrivateError::Writable { .. }), "{e}");
        assert!(e.to_string().contains("chmod 700"), "{e}");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&home).unwrap();

        let link = base.path().join("link");
        std::os::unix::fs::symlink(&home, &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link).unwrap_err(),
            PrivateError::Symlink(_)
        ));
        let file = base.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            ensure_private_dir(&file).unwrap_err(),
            PrivateError::NotADirectory(_)
        ));
    }

    /// Needs root: a directory handed to another user.
    #[test]
    fn a_directory_of_another_user_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let theirs = base.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
        let chowned = std::os::unix::fs::chown(&theirs, Some(65534), Some(65534));
        if nix::unistd::Uid::effective().is_root() {
            chowned.unwrap();
        } else {
            assert!(chowned.is_err(), "only root can give a directory away");
            return;
        }
        let e = ensure_private_dir(&theirs).unwrap_err();
        assert!(
            matches!(e, PrivateError::ForeignOwner { owner: 65534, .. }),
            "{e}"
        );
    }

    #[test]
    fn files_are_0600_and_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("bashrc");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("workingset.tmp");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_file(&link, true).is_err());
        assert!(create_file(&link, false).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");

        let f = dir.path().join("new");
        create_file(&f, false).unwrap();
        assert!(create_file(&f, false).is_err(), "exclusive");
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        create_file(&f, true).unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn temp_dirs_are_private_and_unpredictable() {
        let a = temp_dir("capsule-").unwrap();
        let b = temp_dir("capsule-").unwrap();
        assert_ne!(a, b);
        check_private_dir(&a).unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().mode() & 0o777, 0o700);
        std::fs::remove_dir(a).unwrap();
        std::fs::remove_dir(b).unwrap();
    }
}
