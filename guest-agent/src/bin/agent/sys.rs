//! Thin safe wrappers over the few system calls PID 1 needs that the
//! standard library does not offer. All `unsafe` in the agent's init and
//! process code lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is a valid NUL-terminated string or null.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr() as *const libc::c_void),
        )
    })
}

pub fn umount(target: &str, flags: libc::c_int) -> io::Result<()> {
    let target = cstr(target)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), flags) })
}

pub fn chroot(path: &str) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::chroot(path.as_ptr()) })
}

pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) })
}

/// Mixes `seed` into the kernel's entropy pool, credited as random, then
/// reseeds the kernel's random number generator from the pool at once,
/// so the very next read of /dev/urandom depends on it.
pub fn reseed_kernel_rng(seed: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]),
    // RNDRESEEDCRNG = _IO('R', 0x07).
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let words = seed.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (seed.len() * 8) as u32;
    info[1] = seed.len() as u32;
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a rand_pool_info header followed by `buf_size`
    // bytes of buffer, all inside the allocation.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })
}

/// Sets the wall clock.
pub fn set_realtime(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

pub fn sync() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() };
}

/// Brings the loopback interface (`lo`) up, as an init's network set-up
/// would: 127.0.0.1 is routable once it is.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain syscall creating a new descriptor.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned here.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is a valid (empty) value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of a live ifreq naming "lo".
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) })?;
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS set.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads a live ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) })
}

/// Sends `signal` to `pid` (negative: a process group; -1: everyone but us).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::kill(pid, signal) })
}

/// Restarts the machine. The VMM treats a guest reset as the end of the VM
/// (the kernel is booted with `reboot=k`, which resets through the i8042).
pub fn reboot() -> io::Error {
    // SAFETY: plain syscall; only returns on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// How a child ended, decoded from a wait status.
#[derive(Clone, Copy, Debug)]
pub struct WaitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Blocks until any child changes state. `Ok(None)` means there are no
/// children at all.
pub fn wait_any() -> io::Result<Option<(i32, WaitStatus)>> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let decoded = if libc::WIFEXITED(status) {
                WaitStatus {
                    code: Some(libc::WEXITSTATUS(status)),
                    signal: None,
                }
            } else if libc::WIFSIGNALED(status) {
                WaitStatus {
                    code: None,
                    signal: Some(libc::WTERMSIG(status)),
                }
            } else {
                continue;
            };
            return Ok(Some((pid, decoded)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Blocks the termination signals PID 1 handles in this thread and every
/// thread spawned after it, then waits for one of them.
pub struct SignalWaiter {
    set: libc::sigset_t,
}

impl SignalWaiter {
    pub fn block(signals: &[i32]) -> io::Result<Self> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t.
        unsafe { libc::sigemptyset(&mut set) };
        for &s in signals {
            // SAFETY: `set` is a valid sigset_t.
            unsafe { libc::sigaddset(&mut set, s) };
        }
        // SAFETY: `set` is valid; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(SignalWaiter { set })
    }

    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: `set` is valid and `sig` is a valid out-pointer.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }
}

/// Makes `cmd`'s child start with no signals blocked. PID 1 blocks the
/// init signals in every thread (to receive them with `sigwait`), and a
/// blocked mask survives exec: without this, user processes could not be
/// stopped with SIGTERM.
pub fn unblock_signals_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls
    // sigemptyset and pthread_sigmask, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}
