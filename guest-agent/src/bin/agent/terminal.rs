//! A process on a pseudo-terminal: the pair of ends, the child's session
//! and controlling terminal, resizes, and pumping what the terminal
//! renders to the host.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use guest_agent::protocol::{channel, Frame, TerminalSize, DATA_CHUNK};

use crate::stream::ExecStream;
use crate::sys;

/// The agent's end of a terminal (the master) and the child's (the slave).
pub struct Pair {
    pub master: File,
    pub slave: OwnedFd,
}

fn winsize(size: TerminalSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Opens a new terminal of `size`. Both ends are close-on-exec from the
/// start (a process another thread spawns meanwhile must not inherit
/// either); the child gets the slave as its stdio through
/// [`Pair::attach`].
pub fn open(size: TerminalSize) -> io::Result<Pair> {
    use std::os::unix::fs::OpenOptionsExt;
    // std opens with O_CLOEXEC.
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?;
    let unlocked: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int that outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlocked) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER opens the master's slave with these flags and
    // returns a new descriptor (Linux 4.13 and later).
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this function owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    resize(&master, size)?;
    Ok(Pair { master, slave })
}

impl Pair {
    /// Makes the terminal `cmd`'s stdin, stdout and stderr, and its
    /// controlling terminal in a session of its own (so job control and
    /// Ctrl-C work, and its process group is its pid, as for any exec).
    /// `cmd` must not be given a process group: a group leader cannot
    /// start a session.
    pub fn attach(&self, cmd: &mut Command) -> io::Result<()> {
        cmd.stdin(Stdio::from(self.slave.try_clone()?))
            .stdout(Stdio::from(self.slave.try_clone()?))
            .stderr(Stdio::from(self.slave.try_clone()?));
        // SAFETY: the closure runs between fork and exec and calls only
        // setsid and ioctl, which are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Stdin is the slave by now.
                if libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

/// Sets a terminal's size; the kernel sends its foreground job SIGWINCH.
pub fn resize(master: &File, size: TerminalSize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a winsize that outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Wakes a terminal's pump from its wait for output: the session's
/// leader exited, or the host left (the stream was abandoned).
pub struct Wake {
    fd: OwnedFd,
    leader_exited: AtomicBool,
}

impl Wake {
    pub fn new() -> io::Result<Self> {
        // SAFETY: a plain syscall creating a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Wake {
            // SAFETY: eventfd returned a fresh descriptor owned here.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            leader_exited: AtomicBool::new(false),
        })
    }

    pub fn leader_exited(&self) {
        self.leader_exited.store(true, Ordering::SeqCst);
        self.notify();
    }

    pub fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Takes the wake-up (so the next wait sleeps again).
    fn take(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from a non-blocking
        // eventfd; nothing to read is EAGAIN, which is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

/// Waits until `master` has something to read (or hung up), or `wake`
/// fires (not with `drain_only`, which only looks); returns whether the
/// terminal is readable.
fn wait_readable(master: &File, wake: &Wake, drain_only: bool) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout_ms = if drain_only { 0 } else { -1 };
    loop {
        // SAFETY: `fds` is a valid array of two pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if fds[1].revents != 0 {
            wake.take();
        }
        return rc > 0 && fds[0].revents != 0;
    }
}

/// Forwards what the terminal renders to the host on channel 1, within
/// the host's credit. Ends when every holder of the slave is gone, or
/// when the leader has exited and nothing more is ready to read: a
/// background job left holding the terminal does not keep the session
/// open. If the host detaches, the session is hung up (SIGHUP to the
/// leader's group, as a closed terminal window does) and its output
/// drained.
pub fn pump(
    mut master: File,
    stream: Arc<ExecStream>,
    leader: i32,
    wake: Arc<Wake>,
) -> std::thread::JoinHandle<()> {
    crate::exec::spawn_thread("terminal", move || {
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut hung_up = false;
        loop {
            if !hung_up && !stream.is_live() {
                hung_up = true;
                let _ = sys::kill(-leader, libc::SIGHUP);
            }
            let leader_gone = wake.leader_exited.load(Ordering::SeqCst);
            if !wait_readable(&master, &wake, leader_gone) {
                if leader_gone {
                    break;
                }
                continue;
            }
            // None once abandoned: read and drop.
            let reserved = stream.reserve(DATA_CHUNK);
            let want = reserved.unwrap_or(DATA_CHUNK);
            let read = loop {
                match master.read(&mut buf[..want]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other,
                }
            };
            // EIO: the last holder of the slave closed it.
            let n = read.unwrap_or_default();
            if let Some(r) = reserved {
                stream.unreserve(r - n);
                if n > 0 {
                    stream.send(&Frame::data(stream.id, channel::STDOUT, &buf[..n]));
                }
            }
            if n == 0 {
                break;
            }
        }
        stream.send(&Frame::eof(stream.id, channel::STDOUT));
    })
}
