//! The host side of virtio-vsock: Unix sockets standing in for vsock ports.
//!
//! - Host to guest: a host program connects to the device's Unix socket and
//!   writes `CONNECT <port>\n`; once the guest accepts, it reads
//!   `OK <host port>\n` and the socket is the stream.
//! - Guest to host: a guest connection to port P reaches a program
//!   listening on the Unix socket `<path>_P`.
//!
//! Everything the guest sends is checked: wrong addresses, unknown
//! connections and protocol violations are answered with RST.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, EventSet, Events};
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::ReadVolatile;

use super::connection::{Connection, State, TX_BUF_SIZE};

pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Event-loop token of the host listener.
pub const LISTENER_TOKEN: u32 = u32::MAX - 1;
/// Event-loop tokens of host sockets are this plus the descriptor.
pub const FD_TOKEN_BASE: u32 = 1 << 16;

/// Longest `CONNECT <port>\n` line accepted.
const MAX_HANDSHAKE: usize = 32;
/// Open connections (and pending host handshakes) allowed at once; beyond
/// that new ones are refused, so a guest cannot exhaust host descriptors.
const MAX_CONNECTIONS: usize = 1024;
/// Of those, connections the guest opened. Each can hold up to
/// `TX_BUF_SIZE` the host has not read, plus the socket's own buffer; the
/// guest decides how many it opens, so they get a smaller share.
pub const MAX_GUEST_CONNECTIONS: usize = 64;
/// Data-less packets waiting for RX buffers. A guest that floods the TX
/// queue without posting RX buffers loses the surplus, not host memory.
const MAX_CONTROL: usize = 4096;
const FIRST_LOCAL_PORT: u32 = 1 << 30;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    /// Host-side port.
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

/// A packet without data, waiting for an RX buffer.
#[derive(Debug)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

struct Handshake {
    stream: UnixStream,
    buf: Vec<u8>,
}

pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections the guest has closed whose data the host has not read
    /// yet; each is closed once its buffer is flushed.
    lingering: HashMap<RawFd, Connection>,
    control: VecDeque<Control>,
    next_local_port: u32,
}

fn token(fd: RawFd) -> u32 {
    FD_TOKEN_BASE + fd as u32
}

fn watch(ops: &mut EventOps, stream: &UnixStream) {
    let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
    if let Err(e) = ops.add(Events::with_data(stream, token(stream.as_raw_fd()), set)) {
        crate::guest_error!("vsock: cannot watch a host socket: {e:?}");
    }
}

fn unwatch(ops: &mut EventOps, stream: &UnixStream) {
    let _ = ops.remove(Events::empty(stream));
}

impl Muxer {
    /// Listens on `path` (replacing a stale socket file).
    pub fn new(guest_cid: u64, path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = crate::host_socket::bind_private(path)?;
        listener.set_nonblocking(true)?;
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            lingering: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn init(&self, ops: &mut EventOps) {
        let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if let Err(e) = ops.add(Events::with_data(&self.listener, LISTENER_TOKEN, set)) {
            log::error!("vsock: cannot watch the host listener: {e:?}");
        }
    }

    /// Number of open connections, for tests and diagnostics.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Handles readiness of the listener or a host socket.
    pub fn handle_event(&mut self, token: u32, set: EventSet, ops: &mut EventOps) {
        if token == LISTENER_TOKEN {
            self.accept_all(ops);
            return;
        }
        let fd = token.wrapping_sub(FD_TOKEN_BASE) as RawFd;
        if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd, ops);
        } else if self.lingering.contains_key(&fd) {
            self.flush_lingering(fd, ops);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                // Both directions are gone, not just the host's sending.
                conn.host_gone = true;
            }
            let hung_up =
                set.intersects(EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR);
            if hung_up && conn.state == State::HostConnecting {
                // The host gave up before the guest answered.
                self.reset(key, "host hung up before the guest answered", ops);
                return;
            }
            if hung_up || set.contains(EventSet::IN) {
                conn.readable = true;
            }
            if set.contains(EventSet::OUT) {
                if let Err(e) = conn.flush_to_host() {
                    self.reset(key, &format!("host socket write failed: {e}"), ops);
                    return;
                }
                conn.end_host_write_once_flushed();
                self.maybe_credit_update(key);
            }
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // The socket is 0600 in a private directory; a peer of
                    // another user got in some other way and is refused.
                    if !crate::host_socket::peer_is_trusted(&stream) {
                        crate::guest_warn!("vsock: refusing a connection from another user");
                        continue;
                    }
                    if self.open_count() >= MAX_CONNECTIONS {
                        crate::guest_warn!(
                            "vsock: too many connections; refusing a host connection"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    watch(ops, &stream);
                    self.handshakes.insert(
                        stream.as_raw_fd(),
                        Handshake {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::guest_warn!("vsock: accept: {e}");
                    return;
                }
            }
        }
    }

    fn read_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte_buf = [0u8; MAX_HANDSHAKE];
        let outcome = loop {
            match hs.stream.read(&mut byte_buf) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(n) => {
                    hs.buf.extend_from_slice(&byte_buf[..n]);
                    if hs.buf.contains(&b'\n') {
                        break Ok(());
                    }
                    if hs.buf.len() > MAX_HANDSHAKE {
                        break Err("CONNECT line too long");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = outcome.and_then(|()| parse_connect(&hs.buf).ok_or("malformed CONNECT line"));
        match port {
            Ok((peer_port, rest)) => {
                let local_port = self.allocate_local_port();
                let key = ConnKey {
                    local_port,
                    peer_port,
                };
                let mut conn = Connection::new(hs.stream, State::HostConnecting);
                conn.rx_pending = rest;
                self.by_fd.insert(fd, key);
                self.conns.insert(key, conn);
                self.push_control(key, OP_REQUEST, 0);
            }
            Err(why) => {
                log::debug!("vsock: dropping host connection: {why}");
                unwatch(ops, &hs.stream);
            }
        }
    }

    /// Host sockets held: connections, pending handshakes, lingering.
    fn open_count(&self) -> usize {
        self.conns.len() + self.handshakes.len() + self.lingering.len()
    }

    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Numbers host-initiated connections from `port` on (restore).
    pub fn continue_local_ports_from(&mut self, port: u32) {
        self.next_local_port = port.max(FIRST_LOCAL_PORT);
    }

    /// Every connection the guest may still think open: the live ones
    /// (at most [`MAX_CONNECTIONS`]) and those whose reset it has yet to
    /// take, at most as many again. A reset answering a packet for no
    /// connection at all is not one: the guest had nothing open there.
    pub fn guest_connections(&self) -> Vec<ConnKey> {
        let mut keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        let pending = self
            .control
            .iter()
            .filter(|c| c.op == OP_RST)
            .map(|c| c.key)
            .take(MAX_CONNECTIONS);
        keys.extend(pending);
        keys.sort_by_key(|k| (k.local_port, k.peer_port));
        keys.dedup();
        keys
    }

    /// Tells the guest that connections it had before a restore are gone
    /// (their host ends belonged to another process): a reset each, ahead
    /// of every packet of a new connection, so the guest hears of the old
    /// ones first and a host program may connect at once.
    pub fn reset_stale(&mut self, keys: &[ConnKey]) {
        for &key in keys {
            self.push_control(key, OP_RST, 0);
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    fn push_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL {
            crate::guest_warn!("vsock: guest is not taking packets; dropping a control packet");
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    fn maybe_credit_update(&mut self, key: ConnKey) {
        if self
            .conns
            .get(&key)
            .is_some_and(Connection::credit_update_due)
        {
            self.queue_credit_update(key);
        }
    }

    /// Queues a credit update unless one is already waiting.
    fn queue_credit_update(&mut self, key: ConnKey) {
        if !self
            .control
            .iter()
            .any(|c| c.key == key && c.op == OP_CREDIT_UPDATE)
        {
            self.push_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Drops a connection and tells the guest.
    fn reset(&mut self, key: ConnKey, why: &str, ops: &mut EventOps) {
        log::debug!("vsock: resetting connection {key:?}: {why}");
        self.remove(key, ops);
        self.push_control(key, OP_RST, 0);
    }

    /// Ends a connection both sides are done with: the guest hears RST,
    /// which completes its close, and guest data the host has not read yet
    /// is still delivered before the host socket closes.
    fn finish(&mut self, key: ConnKey, ops: &mut EventOps) {
        log::debug!("vsock: closing connection {key:?}");
        let Some(mut conn) = self.detach(key) else {
            return;
        };
        self.push_control(key, OP_RST, 0);
        if conn.flush_to_host().is_ok() && !conn.tx_buf.is_empty() {
            // Still watched: OUT readiness flushes the rest.
            self.lingering.insert(conn.stream.as_raw_fd(), conn);
        } else {
            unwatch(ops, &conn.stream);
        }
    }

    fn flush_lingering(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.lingering.get_mut(&fd) else {
            return;
        };
        if conn.flush_to_host().is_err() || conn.tx_buf.is_empty() {
            if let Some(conn) = self.lingering.remove(&fd) {
                unwatch(ops, &conn.stream);
            }
        }
    }

    /// Drops a connection without telling the guest.
    fn remove(&mut self, key: ConnKey, ops: &mut EventOps) {
        if let Some(conn) = self.detach(key) {
            unwatch(ops, &conn.stream);
        }
    }

    /// Takes a connection out of the tables, with the control packets
    /// queued for it (except RST); its socket stays open and watched.
    fn detach(&mut self, key: ConnKey) -> Option<Connection> {
        self.control.retain(|c| c.key != key || c.op == OP_RST);
        let conn = self.conns.remove(&key)?;
        self.by_fd.remove(&conn.stream.as_raw_fd());
        Some(conn)
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet<B: BitmapSlice>(
        &mut self,
        pkt: &VsockPacket<B>,
        ops: &mut EventOps,
    ) {
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if pkt.src_cid() != self.guest_cid
            || pkt.dst_cid() != HOST_CID
            || pkt.type_() != TYPE_STREAM
        {
            log::debug!("vsock: dropping misaddressed packet");
            if pkt.op() != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        }
        if pkt.op() == OP_REQUEST {
            self.guest_connect(key, pkt, ops);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if pkt.op() != OP_RST {
                self.push_control(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        match (pkt.op(), conn.state) {
            (OP_RESPONSE, State::HostConnecting) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.local_port);
                if let Err(e) = conn.stream.write_all(line.as_bytes()) {
                    self.reset(key, &format!("cannot answer the host: {e}"), ops);
                }
            }
            // After the host's half-close the guest may still send.
            (OP_RW, State::Established | State::HostClosed) => {
                let result = match pkt.data_slice() {
                    Some(data) => {
                        let mut buf = vec![0u8; data.len()];
                        data.copy_to(&mut buf[..]);
                        conn.send_to_host(&buf)
                    }
                    None => Ok(()),
                };
                if let Err(e) = result {
                    self.reset(key, &format!("forwarding guest data failed: {e}"), ops);
                } else {
                    self.maybe_credit_update(key);
                }
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.queue_credit_update(key),
            (OP_SHUTDOWN, _) => {
                let flags = pkt.flags();
                log::debug!("vsock: guest shutdown {flags:#x} on {key:?}");
                if flags & SHUTDOWN_SEND != 0 {
                    // The host reads end-of-file once it has everything
                    // the guest sent before.
                    conn.peer_done_sending = true;
                    if let Err(e) = conn.flush_to_host() {
                        self.reset(key, &format!("host socket write failed: {e}"), ops);
                        return;
                    }
                    conn.end_host_write_once_flushed();
                }
                let guest_done =
                    flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND;
                let both_done = conn.state == State::HostClosed && conn.peer_done_sending;
                if guest_done || both_done {
                    self.finish(key, ops);
                }
            }
            (OP_RST, _) => {
                log::debug!("vsock: guest reset connection {key:?}");
                self.remove(key, ops)
            }
            (op, state) => self.reset(key, &format!("unexpected op {op} in state {state:?}"), ops),
        }
    }

    fn guest_connect<B: BitmapSlice>(
        &mut self,
        key: ConnKey,
        pkt: &VsockPacket<B>,
        ops: &mut EventOps,
    ) {
        if self.conns.contains_key(&key) {
            self.reset(key, "guest reopened a live connection", ops);
            return;
        }
        let from_guest = (self.conns.values().chain(self.lingering.values()))
            .filter(|c| c.from_guest)
            .count();
        if self.open_count() >= MAX_CONNECTIONS || from_guest >= MAX_GUEST_CONNECTIONS {
            crate::guest_warn!("vsock: too many connections; refusing a guest connection");
            self.push_control(key, OP_RST, 0);
            return;
        }
        let target = format!("{}_{}", self.path.display(), key.local_port);
        let stream = match crate::host_socket::connect_nonblocking(Path::new(&target)) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("vsock: guest connect to port {}: {e}", key.local_port);
                self.push_control(key, OP_RST, 0);
                return;
            }
        };
        watch(ops, &stream);
        let mut conn = Connection::new(stream, State::Established);
        conn.from_guest = true;
        conn.update_peer_credit(pkt.buf_alloc(), pkt.fwd_cnt());
        self.by_fd.insert(conn.stream.as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.push_control(key, OP_RESPONSE, 0);
    }

    /// Whether there is anything to put in an RX buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.control.is_empty()
            || self.conns.values().any(|c| {
                c.state == State::Established
                    && (c.readable || !c.rx_pending.is_empty())
                    && c.peer_credit() > 0
            })
    }

    fn write_header<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<B>,
        key: ConnKey,
        op: u16,
        flags: u32,
        len: u32,
    ) {
        let fwd_cnt = match self.conns.get_mut(&key) {
            Some(conn) => {
                conn.last_fwd_cnt_sent = conn.fwd_cnt;
                conn.fwd_cnt.0
            }
            None => 0,
        };
        pkt.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(key.local_port)
            .set_dst_port(key.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_flags(flags)
            .set_len(len)
            .set_buf_alloc(TX_BUF_SIZE)
            .set_fwd_cnt(fwd_cnt);
    }

    /// Fills one RX buffer. Returns false if there was nothing to send
    /// after all (the buffer is then unused).
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        pkt: &mut VsockPacket<B>,
        ops: &mut EventOps,
    ) -> bool {
        if let Some(c) = self.control.pop_front() {
            self.write_header(pkt, c.key, c.op, c.flags, 0);
            return true;
        }
        let capacity = pkt.data_slice().map_or(0, |d| d.len());
        let ready: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Established
                    && (c.readable || !c.rx_pending.is_empty())
                    && c.peer_credit() > 0
            })
            .map(|(k, _)| *k)
            .collect();
        for key in ready {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let want = capacity.min(conn.peer_credit() as usize);
            if want == 0 {
                return false;
            }
            let Some(data) = pkt.data_slice().and_then(|d| d.subslice(0, want).ok()) else {
                return false;
            };
            let result = if !conn.rx_pending.is_empty() {
                let n = want.min(conn.rx_pending.len());
                data.copy_from(&conn.rx_pending[..n]);
                conn.rx_pending.drain(..n);
                Ok(n)
            } else {
                let mut data = data;
                loop {
                    match conn.stream.read_volatile(&mut data) {
                        Err(vm_memory::VolatileMemoryError::IOError(e))
                            if e.kind() == io::ErrorKind::Interrupted => {}
                        other => break other,
                    }
                }
            };
            match result {
                Ok(0) => {
                    // The host will send nothing more: tell the guest, and
                    // say whether the host still reads (a half-close) or
                    // is gone altogether.
                    conn.state = State::HostClosed;
                    conn.readable = false;
                    let flags = if conn.host_gone {
                        SHUTDOWN_RCV | SHUTDOWN_SEND
                    } else {
                        SHUTDOWN_SEND
                    };
                    self.write_header(pkt, key, OP_SHUTDOWN, flags, 0);
                    return true;
                }
                Ok(n) => {
                    conn.rx_cnt += Wrapping(n as u32);
                    self.write_header(pkt, key, OP_RW, 0, n as u32);
                    return true;
                }
                Err(vm_memory::VolatileMemoryError::IOError(e))
                    if e.kind() == io::ErrorKind::WouldBlock =>
                {
                    conn.readable = false;
                }
                Err(e) => {
                    log::debug!("vsock: host socket read failed: {e}");
                    self.remove(key, ops);
                    self.write_header(pkt, key, OP_RST, 0, 0);
                    return true;
                }
            }
        }
        false
    }

    /// Closes every host socket and stops accepting new ones: the VM is
    /// gone, so host programs must see end-of-file rather than wait.
    /// Used once the event loop has stopped, so no epoll bookkeeping.
    pub fn disconnect_host(&mut self) {
        self.conns.clear();
        self.by_fd.clear();
        self.lingering.clear();
        self.handshakes.clear();
        self.control.clear();
        let _ = std::fs::remove_file(&self.path);
    }

    /// Closes every connection; used on device reset.
    pub fn reset_all(&mut self, ops: &mut EventOps) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key, ops);
        }
        for (_, hs) in self.handshakes.drain() {
            unwatch(ops, &hs.stream);
        }
        for (_, conn) in self.lingering.drain() {
            unwatch(ops, &conn.stream);
        }
        self.control.clear();
    }
}

impl Drop for Muxer {
    /// The socket file goes with the listener: nothing is left to connect
    /// to a device that is gone.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Parses `CONNECT <port>\n`, returning the port and any bytes after the
/// newline.
fn parse_connect(buf: &[u8]) -> Option<(u32, Vec<u8>)> {
    let nl = buf.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&buf[..nl]).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim().parse().ok()?;
    Some((port, buf[nl + 1..].to_vec()))
}

/// Helper for host programs: connects to the device's socket and opens a
/// stream to `port` in the guest. Waits up to `timeout` for the guest to
/// accept or refuse.
pub fn connect_to_guest(
    path: &Path,
    port: u32,
    timeout: std::time::Duration,
) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(path)?;
    // What goes over it reaches the guest's agent (commands, their input):
    // only a VMM of this user's, or root's, may be on the other end.
    if !crate::host_socket::peer_is_trusted(&stream) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by another user's process: refusing to use it",
                path.display()
            ),
        ));
    }
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the reply a byte at a time: anything after the newline belongs
    // to the caller's protocol.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_HANDSHAKE {
        let n = stream.read(&mut byte).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("guest vsock port {port} did not answer within {timeout:?}"),
            ),
            _ => e,
        })?;
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("nothing is listening on guest vsock port {port}"),
                ))
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    if line.starts_with(b"OK ") {
        stream.set_read_timeout(None)?;
        Ok(stream)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected reply from the vsock device",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1024\n"), Some((1024, vec![])));
        assert_eq!(
            parse_connect(b"CONNECT 52\nabc"),
            Some((52, b"abc".to_vec()))
        );
        assert_eq!(parse_connect(b"CONNECT x\n"), None);
        assert_eq!(parse_connect(b"HELLO 1\n"), None);
        assert_eq!(parse_connect(b"CONNECT 1"), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999\n"), None);
    }
}
