//! AF_VSOCK sockets. The standard library has none, so this is the one
//! place in the agent that talks to the socket syscalls directly.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The host's context id.
pub const HOST_CID: u32 = 2;

fn sockaddr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A listening vsock socket.
pub struct Listener(OwnedFd);

impl Listener {
    pub fn bind(port: u32) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let fd = socket()?;
        let addr = sockaddr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: plain syscall on a descriptor we own.
        check(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(Listener(fd))
    }

    /// Accepts one connection; the stream is a `File` so it reads, writes
    /// and clones like any descriptor.
    pub fn accept(&self) -> io::Result<File> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: null address pointers are allowed by accept4.
            let fd: RawFd = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new descriptor we now own.
                return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Connects to `port` on the host.
pub fn connect_host(port: u32) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let fd = socket()?;
    let addr = sockaddr(HOST_CID, port);
    // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(File::from(fd))
}

/// Shuts both directions of a connected socket, waking any blocked reader.
pub fn shutdown(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a descriptor `file` owns.
    unsafe { libc::shutdown(file.as_raw_fd(), libc::SHUT_RDWR) };
}
