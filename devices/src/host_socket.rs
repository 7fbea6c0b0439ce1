//! Unix sockets the host side of a VM listens on. They hand out access to
//! the guest (the vsock socket reaches the agent, which runs anything as
//! root in the guest) or to the VM itself, so only the user running the
//! VMM (or root) may use them: each is created 0600 inside a private
//! directory, and every connection's peer is checked again on accept.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Uid;

/// Binds a listening socket at `path`, readable and writable by its
/// owner only.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether the process at the other end of `stream` runs as this
/// process's user or as root.
pub fn peer_is_trusted(stream: &UnixStream) -> bool {
    match getsockopt(stream, PeerCredentials) {
        Ok(cred) => cred.uid() == 0 || cred.uid() == Uid::effective().as_raw(),
        Err(_) => false,
    }
}

/// Connects to the Unix socket at `path` without blocking: for Unix
/// sockets a non-blocking connect either completes at once or fails with
/// EAGAIN (the listener's backlog is full), so a slow or swamped listener
/// is refused instead of stalling the caller (the device event loop).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_private_and_peers_are_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(peer_is_trusted(&server));
        assert!(peer_is_trusted(&client));
    }

    /// A peer of another user is refused even where the socket's mode
    /// would let it connect. Needs root to become that user (the host
    /// tier runs as root under `make test`).
    #[test]
    fn a_peer_of_another_user_is_not_trusted() {
        assert!(
            Uid::effective().is_root(),
            "this test needs root, to connect as another user"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = bind_private(&path).unwrap();
        // Opened up, so only the peer check stands in the way.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let connect_as_nobody = std::thread::spawn(move || {
            // The raw syscall changes this thread's credentials alone
            // (glibc's setresuid would change every thread's); the
            // thread ends with them.
            // SAFETY: setresuid takes three integers; -1 leaves a field.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1i64, 65534i64, -1i64) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
            UnixStream::connect(&path).unwrap()
        });
        let _client = connect_as_nobody.join().unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!peer_is_trusted(&server));
    }
}
