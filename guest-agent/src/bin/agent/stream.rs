//! One exec stream on the agent's side: the credit the host gave it for
//! output, and the stdin the host sent that the process has not read.
//!
//! The connection's reader only ever appends to a stream (bounded by the
//! agent's window) and never waits for one, so a process that does not
//! read its stdin, or whose output the host does not take, stalls only
//! its own threads. Once the host resets the stream or the connection
//! goes, the stream is *abandoned*: output is read and dropped (so the
//! process is not stuck on a full pipe) and stdin is closed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guest_agent::protocol::{channel, Frame, AGENT_WINDOW};

/// The connection's sending half, shared by every stream's threads. Each
/// frame is written whole under the lock.
pub type Writer = Arc<Mutex<File>>;

/// How long a write may keep failing for want of memory before the
/// connection is given up.
const SHORT_OF_MEMORY_PATIENCE: Duration = Duration::from_secs(30);

/// Sends a frame to the host, whole or not at all. A guest short of
/// memory fails vsock writes with ENOMEM (a 64 KiB packet is an order-4
/// allocation): that is waited out, never a frame silently dropped. Any
/// other failure, or one that lasts, shuts the connection, so the host
/// sees it broken rather than a stream with a hole in it.
pub fn send(writer: &Writer, frame: &Frame) {
    let Ok(bytes) = frame.encode() else {
        return;
    };
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let mut at = 0;
    let mut pause = Duration::from_millis(1);
    let mut short_since: Option<Instant> = None;
    while at < bytes.len() {
        match w.write(&bytes[at..]) {
            Ok(0) => return crate::vsock::shutdown(&w),
            Ok(n) => {
                at += n;
                short_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOMEM | libc::ENOBUFS | libc::EAGAIN)
                ) =>
            {
                let since = *short_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SHORT_OF_MEMORY_PATIENCE {
                    eprintln!("capsule-agent: cannot send to the host for {SHORT_OF_MEMORY_PATIENCE:?}: {e}");
                    return crate::vsock::shutdown(&w);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => {
                // A host that went away (as after every restore) is no
                // news; anything else is worth a line on the console.
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ESHUTDOWN)
                ) {
                    eprintln!("capsule-agent: sending to the host failed: {e}");
                }
                return crate::vsock::shutdown(&w);
            }
        }
    }
}

pub struct ExecStream {
    pub id: u32,
    writer: Writer,
    state: Mutex<State>,
    changed: Condvar,
    /// Runs when the stream is abandoned, for a thread that waits on
    /// something other than the stream (a terminal's output).
    on_abandon: Mutex<Option<Box<dyn Fn() + Send>>>,
}

struct State {
    /// Output bytes the host will still take.
    credit: u64,
    /// False once abandoned (see the module comment).
    live: bool,
    stdin: VecDeque<Vec<u8>>,
    /// Stdin bytes received and not yet granted back to the host.
    stdin_outstanding: u64,
    /// The host sent EOF on stdin.
    stdin_eof: bool,
    /// The process closed its end of stdin: what arrives is dropped.
    stdin_gone: bool,
}

impl ExecStream {
    pub fn new(id: u32, writer: Writer, credit: u32) -> Arc<Self> {
        Arc::new(ExecStream {
            id,
            writer,
            state: Mutex::new(State {
                credit: u64::from(credit),
                live: true,
                stdin: VecDeque::new(),
                stdin_outstanding: 0,
                stdin_eof: false,
                stdin_gone: false,
            }),
            changed: Condvar::new(),
            on_abandon: Mutex::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    pub fn send(&self, frame: &Frame) {
        if self.lock().live {
            send(&self.writer, frame);
        }
    }

    /// The host granted more output credit.
    pub fn add_credit(&self, bytes: u32) {
        let mut s = self.lock();
        s.credit = s.credit.saturating_add(u64::from(bytes));
        drop(s);
        self.changed.notify_all();
    }

    /// Waits for output credit and reserves up to `max` bytes of it;
    /// `None` once abandoned (read and drop, then).
    pub fn reserve(&self, max: usize) -> Option<usize> {
        let mut s = self.lock();
        loop {
            if !s.live {
                return None;
            }
            if s.credit > 0 {
                let n = (max as u64).min(s.credit) as usize;
                s.credit -= n as u64;
                return Some(n);
            }
            s = self.wait(s);
        }
    }

    /// Waits for `n` bytes of output credit and takes them (`n` at most
    /// the host's window); `false` once abandoned.
    pub fn reserve_exact(&self, n: usize) -> bool {
        let mut s = self.lock();
        loop {
            if !s.live {
                return false;
            }
            if s.credit >= n as u64 {
                s.credit -= n as u64;
                return true;
            }
            s = self.wait(s);
        }
    }

    /// Gives back credit reserved and not used.
    pub fn unreserve(&self, bytes: usize) {
        if bytes > 0 {
            self.add_credit(bytes as u32);
        }
    }

    /// Stdin from the host. An error is the host overrunning the window.
    pub fn push_stdin(&self, data: Vec<u8>) -> Result<(), String> {
        let mut s = self.lock();
        let n = data.len() as u64;
        if s.stdin_outstanding + n > u64::from(AGENT_WINDOW) {
            return Err(format!(
                "stream {}: the host sent stdin beyond the {AGENT_WINDOW}-byte window",
                self.id
            ));
        }
        if s.stdin_gone || !s.live || s.stdin_eof {
            // Nobody will read it: give the credit straight back.
            drop(s);
            if n > 0 {
                self.send(&Frame::window(self.id, n as u32));
            }
            return Ok(());
        }
        s.stdin_outstanding += n;
        s.stdin.push_back(data);
        drop(s);
        self.changed.notify_all();
        Ok(())
    }

    pub fn close_stdin(&self) {
        self.lock().stdin_eof = true;
        self.changed.notify_all();
    }

    /// The next stdin chunk for the process; `None` at EOF or once
    /// abandoned.
    pub fn next_stdin(&self) -> Option<Vec<u8>> {
        let mut s = self.lock();
        loop {
            if !s.live {
                return None;
            }
            if let Some(chunk) = s.stdin.pop_front() {
                return Some(chunk);
            }
            if s.stdin_eof {
                return None;
            }
            s = self.wait(s);
        }
    }

    /// The process took `bytes` of stdin: the host may send as many more.
    pub fn stdin_taken(&self, bytes: usize) {
        self.lock().stdin_outstanding -= bytes as u64;
        if bytes > 0 {
            self.send(&Frame::window(self.id, bytes as u32));
        }
    }

    /// The process closed its stdin: drop what is queued (granting it
    /// back) and tell the host, whose writes would go nowhere.
    pub fn stdin_gone(&self) {
        let dropped = {
            let mut s = self.lock();
            s.stdin_gone = true;
            let n: u64 = s.stdin.drain(..).map(|c| c.len() as u64).sum();
            s.stdin_outstanding -= n;
            // The end of stdin goes first, sent under the lock, so no
            // credit for stdin (here or from push_stdin) overtakes it: the
            // host's writer stops at once instead of racing on.
            if s.live {
                send(&self.writer, &Frame::eof(self.id, channel::STDIN));
            }
            n
        };
        if dropped > 0 {
            self.send(&Frame::window(self.id, dropped as u32));
        }
    }

    /// False once the host reset the stream or the connection went.
    pub fn is_live(&self) -> bool {
        self.lock().live
    }

    /// The host reset the stream or the connection went.
    pub fn abandon(&self) {
        self.lock().live = false;
        self.changed.notify_all();
        if let Some(hook) = &*self.on_abandon.lock().unwrap_or_else(|p| p.into_inner()) {
            hook();
        }
    }

    /// `hook` runs whenever the stream is abandoned.
    pub fn on_abandon(&self, hook: impl Fn() + Send + 'static) {
        *self.on_abandon.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }
}

/// A stream's output as a [`std::io::Write`]: each write sends what the
/// host's credit allows (waiting for some), on `channel`. Fails once the
/// stream is abandoned.
pub struct StreamWriter<'a> {
    pub stream: &'a ExecStream,
    pub channel: u8,
    pub sent: u64,
}

impl std::io::Write for StreamWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some(n) = self
            .stream
            .reserve(buf.len().min(guest_agent::protocol::DATA_CHUNK))
        else {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        };
        self.stream
            .send(&Frame::data(self.stream.id, self.channel, &buf[..n]));
        self.sent += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the host sends on a stream's channel 0, as a [`std::io::Read`]:
/// credit goes back to the host as each chunk is used up. Ends at the
/// host's Eof, or when the stream is abandoned (see [`ExecStream::is_live`]).
pub struct StdinReader<'a> {
    pub stream: &'a ExecStream,
    chunk: Vec<u8>,
    at: usize,
    pub received: u64,
}

impl<'a> StdinReader<'a> {
    pub fn new(stream: &'a ExecStream) -> Self {
        StdinReader {
            stream,
            chunk: Vec::new(),
            at: 0,
            received: 0,
        }
    }
}

impl std::io::Read for StdinReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.chunk.len() {
            if !self.chunk.is_empty() {
                self.stream.stdin_taken(self.chunk.len());
                self.chunk.clear();
                self.at = 0;
            }
            match self.stream.next_stdin() {
                Some(chunk) => {
                    self.received += chunk.len() as u64;
                    self.chunk = chunk;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Drop for StdinReader<'_> {
    fn drop(&mut self) {
        if !self.chunk.is_empty() {
            self.stream.stdin_taken(self.chunk.len());
        }
    }
}
