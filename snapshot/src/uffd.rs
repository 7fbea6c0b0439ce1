//! Lazy restore through userfaultfd: guest memory starts as an empty
//! anonymous mapping, and the first touch of each chunk (by a vCPU, via
//! KVM, or by the VMM itself) is served from the memory file by a handler
//! thread that copies the whole chunk in at once.
//!
//! Unlike a private file mapping, every page a VM touches becomes its own
//! (no page cache shared between forks), but no page fault ever goes to
//! the filesystem, and the pages a restored guest is known to need can be
//! copied in before it runs: the server records which chunks were touched
//! (the working set) and a later restore can prefetch them.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, Uffd, UffdBuilder};

/// Default copy granularity: a fault brings in this much around it.
pub const DEFAULT_CHUNK: usize = 64 * 1024;

/// One registered range: `len` bytes of host memory at `host_addr`, whose
/// contents are at `file_offset` in the memory file.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    pub host_addr: usize,
    pub len: usize,
    pub file_offset: u64,
}

/// What the server did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Faults that had to be served (chunks copied on demand).
    pub faults: u64,
    /// Chunks copied before the guest ran.
    pub prefetched: u64,
    /// Bytes copied in (zero chunks are mapped, not copied).
    pub bytes_copied: u64,
}

#[derive(Default)]
struct Shared {
    /// Chunk file offsets in the order they were first served.
    touched: Mutex<Vec<u64>>,
    faults: AtomicU64,
    prefetched: AtomicU64,
    bytes_copied: AtomicU64,
}

/// The handler thread and what it learned.
pub struct UffdServer {
    thread: Option<JoinHandle<()>>,
    stop: OwnedFd,
    shared: Arc<Shared>,
}

struct Handler {
    uffd: Uffd,
    file: File,
    ranges: Vec<Range>,
    chunk: usize,
    /// One bit per chunk of each range: already served.
    served: Vec<Vec<u64>>,
    buf: Vec<u8>,
    shared: Arc<Shared>,
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl UffdServer {
    /// Registers `ranges` with a new userfaultfd and starts serving their
    /// faults from `file`, `chunk` bytes (a multiple of the page size) at a
    /// time, after copying in the chunks at the file offsets in
    /// `prefetch`. Offsets that do not name a chunk of a range are
    /// ignored (a working set is a hint).
    ///
    /// # Safety
    ///
    /// Every range must be an anonymous private mapping that this process
    /// owns, is not yet populated, and stays mapped until the server is
    /// stopped: the server writes into it.
    pub unsafe fn start(
        file: File,
        ranges: Vec<Range>,
        chunk: usize,
        prefetch: &[u64],
    ) -> io::Result<UffdServer> {
        if chunk == 0 || !chunk.is_multiple_of(4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "chunk must be a multiple of 4096",
            ));
        }
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            // KVM touches guest memory from the kernel on the vCPU's
            // behalf: those faults must reach us too.
            .user_mode_only(false)
            .create()
            .map_err(|e| {
                let denied = match &e {
                    userfaultfd::Error::SystemError(errno) => {
                        matches!(*errno as i32, libc::EPERM | libc::EACCES)
                    }
                    userfaultfd::Error::OpenDevUserfaultfd(io) => {
                        io.kind() == io::ErrorKind::PermissionDenied
                    }
                    _ => false,
                };
                let kind = if denied {
                    io::ErrorKind::PermissionDenied
                } else {
                    io::ErrorKind::Other
                };
                io::Error::new(kind, format!("userfaultfd: {e}"))
            })?;
        for r in &ranges {
            uffd.register(r.host_addr as *mut libc::c_void, r.len)
                .map_err(|e| io::Error::other(format!("registering guest memory: {e}")))?;
        }
        let shared = Arc::new(Shared::default());
        let served = ranges
            .iter()
            .map(|r| vec![0u64; r.len.div_ceil(chunk).div_ceil(64)])
            .collect();
        let mut handler = Handler {
            uffd,
            file,
            ranges,
            chunk,
            served,
            buf: vec![0; chunk],
            shared: shared.clone(),
        };
        for &offset in prefetch {
            if let Some((range, start)) = handler.chunk_at_file_offset(offset) {
                handler.serve(range, start, false);
            }
        }
        let stop = eventfd()?;
        let stop_fd = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || handler.run(stop_fd))?;
        Ok(UffdServer {
            thread: Some(thread),
            stop,
            shared,
        })
    }

    /// File offsets of the chunks served so far, in first-touch order.
    pub fn touched(&self) -> Vec<u64> {
        self.shared
            .touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stats(&self) -> ServeStats {
        ServeStats {
            faults: self.shared.faults.load(Ordering::Relaxed),
            prefetched: self.shared.prefetched.load(Ordering::Relaxed),
            bytes_copied: self.shared.bytes_copied.load(Ordering::Relaxed),
        }
    }

    /// Stops the handler thread. Faults after this are never served, so
    /// nothing may touch the ranges any more.
    pub fn stop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UffdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Handler {
    fn run(mut self, stop: i32) {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("uffd: poll failed: {}", io::Error::last_os_error());
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            loop {
                match self.uffd.read_event() {
                    Ok(Some(Event::Pagefault { addr, .. })) => self.on_fault(addr as usize),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        log::error!("uffd: reading events: {e}");
                        return;
                    }
                }
            }
        }
    }

    fn on_fault(&mut self, addr: usize) {
        let Some(range) = self
            .ranges
            .iter()
            .position(|r| addr >= r.host_addr && addr < r.host_addr + r.len)
        else {
            log::error!("uffd: fault at {addr:#x} outside guest memory");
            return;
        };
        let start = (addr - self.ranges[range].host_addr) / self.chunk * self.chunk;
        if !self.serve(range, start, true) {
            // Served already (two faults raced for one chunk): just wake.
            let page = addr & !4095;
            let _ = self.uffd.wake(page as *mut libc::c_void, 4096);
        }
    }

    fn chunk_at_file_offset(&self, offset: u64) -> Option<(usize, usize)> {
        self.ranges.iter().enumerate().find_map(|(i, r)| {
            let within = offset.checked_sub(r.file_offset)? as usize;
            (within < r.len && within.is_multiple_of(self.chunk)).then_some((i, within))
        })
    }

    /// Copies the chunk at `start` of range `range` in, unless it already
    /// was; returns whether it copied.
    fn serve(&mut self, range: usize, start: usize, wake: bool) -> bool {
        let index = start / self.chunk;
        let bits = &mut self.served[range];
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        if bits[word] & bit != 0 {
            return false;
        }
        bits[word] |= bit;
        let r = self.ranges[range];
        let len = self.chunk.min(r.len - start);
        let dst = (r.host_addr + start) as *mut libc::c_void;
        let file_offset = r.file_offset + start as u64;
        let buf = &mut self.buf[..len];
        if let Err(e) = self.file.read_exact_at(buf, file_offset) {
            // The file was checked at restore; if it fails now the guest
            // gets zeros rather than a hang.
            log::error!("uffd: reading the memory file at {file_offset}: {e}");
            buf.fill(0);
        }
        // Account for the chunk before the copy wakes the faulting thread,
        // so whoever it tells sees the chunk in the working set.
        let zero = buf.iter().all(|&b| b == 0);
        self.shared
            .touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(file_offset);
        let counter = if wake {
            &self.shared.faults
        } else {
            &self.shared.prefetched
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !zero {
            self.shared
                .bytes_copied
                .fetch_add(len as u64, Ordering::Relaxed);
        }
        let mut done = 0usize;
        while done < len {
            let at = (dst as usize + done) as *mut libc::c_void;
            let result = if zero {
                // SAFETY: `at..dst+len` lies in a registered range (the
                // caller of `start` guarantees it stays mapped).
                unsafe { self.uffd.zeropage(at, len - done, wake) }
            } else {
                // SAFETY: as above; `buf[done..]` holds `len - done`
                // readable bytes.
                unsafe {
                    self.uffd
                        .copy(buf[done..].as_ptr().cast(), at, len - done, wake)
                }
            };
            match result {
                Ok(_) => break,
                // The address space changed meanwhile (a fork of this
                // process): carry on after what was copied.
                Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 => done += n,
                Err(e) => {
                    // EEXIST: pages already present; anything else (the
                    // range is going away at teardown) leaves nothing to
                    // do but wake whoever waits.
                    log::debug!("uffd: chunk at {dst:?}: {e}");
                    let _ = self.uffd.wake(dst, len);
                    break;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous private mapping, unmapped on drop.
    struct Anon {
        ptr: *mut u8,
        len: usize,
    }

    impl Anon {
        fn new(len: usize) -> Anon {
            // SAFETY: a fresh anonymous mapping; checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Anon {
                ptr: ptr.cast(),
                len,
            }
        }
        fn bytes(&self) -> &[u8] {
            // SAFETY: the mapping is `len` bytes and lives as long as self.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly what `new` mapped.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn faults_are_served_from_the_file_and_recorded() {
        const LEN: usize = 1 << 20;
        let file = tempfile::tempfile().unwrap();
        // Two ranges back to back in the file; the second chunk of the
        // first range stays a hole (zeros).
        let mut image = vec![0u8; 2 * LEN];
        for (i, b) in image.iter_mut().enumerate() {
            let chunk = i / DEFAULT_CHUNK;
            if chunk != 1 {
                *b = (i % 253) as u8 | 1;
            }
        }
        file.write_all_at(&image, 0).unwrap();
        let (a, b) = (Anon::new(LEN), Anon::new(LEN));
        let ranges = vec![
            Range {
                host_addr: a.ptr as usize,
                len: LEN,
                file_offset: 0,
            },
            Range {
                host_addr: b.ptr as usize,
                len: LEN,
                file_offset: LEN as u64,
            },
        ];
        // SAFETY: `a` and `b` are fresh anonymous mappings that outlive
        // the server (dropped after it, below).
        let mut server = unsafe {
            UffdServer::start(
                file,
                ranges,
                DEFAULT_CHUNK,
                &[LEN as u64 + 3 * DEFAULT_CHUNK as u64],
            )
        }
        .unwrap();
        assert_eq!(server.stats().prefetched, 1);

        // Touch from another thread, as a vCPU would.
        let (pa, pb) = (a.ptr as usize, b.ptr as usize);
        let reader = std::thread::spawn(move || {
            // SAFETY: the mappings outlive this thread (joined below).
            let a = unsafe { std::slice::from_raw_parts(pa as *const u8, LEN) };
            let b = unsafe { std::slice::from_raw_parts(pb as *const u8, LEN) };
            (a[5], a[DEFAULT_CHUNK + 7], b[LEN - 1], b[3 * DEFAULT_CHUNK])
        });
        let (x, hole, y, pre) = reader.join().unwrap();
        assert_eq!(x, image[5]);
        assert_eq!(hole, 0);
        assert_eq!(y, image[2 * LEN - 1]);
        assert_eq!(pre, image[LEN + 3 * DEFAULT_CHUNK]);
        // Everything reads back right.
        assert!(a.bytes() == &image[..LEN]);
        assert!(b.bytes() == &image[LEN..]);

        let touched = server.touched();
        assert_eq!(
            touched[0],
            LEN as u64 + 3 * DEFAULT_CHUNK as u64,
            "prefetch first"
        );
        assert_eq!(touched.len(), 2 * LEN / DEFAULT_CHUNK, "every chunk once");
        let stats = server.stats();
        assert_eq!(stats.faults + stats.prefetched, touched.len() as u64);
        assert_eq!(
            stats.bytes_copied,
            (2 * LEN - DEFAULT_CHUNK) as u64,
            "the zero chunk is mapped, not copied"
        );
        server.stop();
    }
}
