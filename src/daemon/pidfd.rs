//! Waiting for a process to end by its pidfd: no polling, no pid reuse.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// A process's pidfd.
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: u32) -> std::io::Result<PidFd> {
        let pid = libc::pid_t::try_from(pid)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or
        // -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd, and nothing else owns it.
        Ok(PidFd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Blocks until the process has ended.
    pub fn wait(&self) {
        loop {
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(n) if n > 0 => return,
                Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
                // A pidfd that cannot be polled cannot tell us more.
                Err(_) => return,
            }
        }
    }

    /// Waits up to `timeout` for the process to end; whether it did.
    pub fn wait_for(&self, timeout: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(std::time::Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) if n > 0 => return true,
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) if left.is_zero() => return false,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
    }

    /// How our own child ended ("killed by signal 9", "exited with status
    /// 1"), reaping it; `None` for a process that is not our child (one a
    /// restarted daemon adopted).
    pub fn reap(&self) -> Option<String> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        match waitid(
            Id::PIDFd(self.0.as_fd()),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
        ) {
            Ok(WaitStatus::Exited(_, code)) => Some(format!("exited with status {code}")),
            Ok(WaitStatus::Signaled(_, signal, _)) => {
                Some(format!("killed by signal {} ({signal})", signal as i32))
            }
            _ => None,
        }
    }
}
