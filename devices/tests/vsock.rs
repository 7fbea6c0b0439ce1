//! virtio-vsock against real guest memory: the host Unix-socket side and
//! the guest's packets, including hostile ones.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use common::*;
use devices::virtio::vsock::Vsock;

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
const RX: usize = 0;
const TX: usize = 1;
const RX_BUFS: u64 = 0x80_0000;
const TX_BUF: u64 = 0xa0_0000;
const HDR: usize = 44;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pkt {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

impl Pkt {
    fn from_guest(src_port: u32, dst_port: u32, op: u16, data: &[u8]) -> Pkt {
        Pkt {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            op,
            buf_alloc: 256 * 1024,
            data: data.to_vec(),
            ..Default::default()
        }
    }

    fn encode(&self, len_field: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.src_cid.to_le_bytes());
        b.extend_from_slice(&self.dst_cid.to_le_bytes());
        b.extend_from_slice(&self.src_port.to_le_bytes());
        b.extend_from_slice(&self.dst_port.to_le_bytes());
        b.extend_from_slice(&len_field.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes()); // stream
        b.extend_from_slice(&self.op.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        b.extend_from_slice(&self.buf_alloc.to_le_bytes());
        b.extend_from_slice(&self.fwd_cnt.to_le_bytes());
        b.extend_from_slice(&self.data);
        b
    }

    fn decode(b: &[u8]) -> Pkt {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        let len = u32_at(24) as usize;
        Pkt {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
            data: b[HDR..HDR + len].to_vec(),
        }
    }
}

struct Guest {
    d: Driver,
    path: PathBuf,
    _dir: tempfile::TempDir,
    /// RX buffers use one descriptor for header and data (Linux >= 6.2)
    /// or two (older kernels).
    split_rx: bool,
    rx_seen: u16,
}

impl Guest {
    fn new(split_rx: bool) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let d = Driver::new(Vsock::new(GUEST_CID, &path).unwrap(), 16);
        let mut g = Guest {
            d,
            path,
            _dir: dir,
            split_rx,
            rx_seen: 0,
        };
        for slot in 0..8 {
            g.post_rx(slot);
        }
        g
    }

    fn rx_addr(slot: u16) -> u64 {
        RX_BUFS + u64::from(slot) * 0x2000
    }

    /// Offers RX buffer `slot` (descriptors 2*slot and 2*slot+1).
    fn post_rx(&mut self, slot: u16) {
        let addr = Self::rx_addr(slot);
        let head = slot * 2;
        if self.split_rx {
            self.d.write_chain(
                RX,
                head,
                &[(addr, HDR as u32, true), (addr + HDR as u64, 4096, true)],
            );
        } else {
            self.d
                .write_chain(RX, head, &[(addr, HDR as u32 + 4096, true)]);
        }
        self.d.submit(RX, head);
    }

    /// Packets the device delivered since the last call; their buffers are
    /// offered again.
    fn recv(&mut self) -> Vec<Pkt> {
        self.d.run();
        let mut out = Vec::new();
        while self.rx_seen != self.d.used_idx(RX) {
            let (id, len) = self.d.used_entry(RX, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let slot = (id / 2) as u16;
            let bytes = self.d.read(Self::rx_addr(slot), len as usize);
            out.push(Pkt::decode(&bytes));
            self.post_rx(slot);
        }
        out
    }

    /// Sends a packet from the guest, header and data in one descriptor
    /// or split in two.
    fn send_raw(&mut self, bytes: &[u8], split: bool) {
        self.d.write(TX_BUF, bytes);
        if split && bytes.len() > HDR {
            self.d.write_chain(
                TX,
                0,
                &[
                    (TX_BUF, HDR as u32, false),
                    (TX_BUF + HDR as u64, (bytes.len() - HDR) as u32, false),
                ],
            );
        } else {
            self.d
                .write_chain(TX, 0, &[(TX_BUF, bytes.len() as u32, false)]);
        }
        self.d.submit(TX, 0);
    }

    fn send(&mut self, p: &Pkt) {
        self.send_raw(&p.encode(p.data.len() as u32), false);
    }
}

fn host_connect(path: &std::path::Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    s
}

fn read_line(s: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

fn establish(g: &mut Guest) -> (UnixStream, u32) {
    let host = host_connect(&g.path, 1024);
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = &pkts[0];
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, req.src_cid),
        (OP_REQUEST, 1024, GUEST_CID, HOST_CID)
    );
    let local = req.src_port;
    g.send(&Pkt::from_guest(1024, local, OP_RESPONSE, &[]));
    assert_eq!(read_line(&host), format!("OK {local}\n"));
    (host, local)
}

#[test]
fn host_initiated_stream_in_both_buffer_layouts() {
    for split in [false, true] {
        let mut g = Guest::new(split);
        let (mut host, local) = establish(&mut g);

        host.write_all(b"ping from host").unwrap();
        let pkts = g.recv();
        assert_eq!(pkts.len(), 1);
        assert_eq!(
            (pkts[0].op, pkts[0].data.as_slice()),
            (OP_RW, &b"ping from host"[..])
        );

        for layout_split in [false, true] {
            let p = Pkt::from_guest(1024, local, OP_RW, b"pong from guest");
            g.send_raw(&p.encode(p.data.len() as u32), layout_split);
            let mut buf = [0u8; 15];
            host.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"pong from guest");
        }

        // More than one RX buffer's worth flows through in order.
        let big: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        host.write_all(&big).unwrap();
        let mut got = Vec::new();
        while got.len() < big.len() {
            let pkts = g.recv();
            assert!(!pkts.is_empty(), "data stalled at {}", got.len());
            for p in pkts {
                assert_eq!(p.op, OP_RW);
                got.extend_from_slice(&p.data);
            }
        }
        assert_eq!(got, big);

        // The host hangs up: the guest is told both directions are gone,
        // and acknowledges with RST.
        drop(host);
        let pkts = g.recv();
        assert!(
            pkts.iter()
                .any(|p| p.op == OP_SHUTDOWN && p.flags == SHUTDOWN_RCV | SHUTDOWN_SEND),
            "{pkts:?}"
        );
        g.send(&Pkt::from_guest(1024, local, OP_RST, &[]));
        assert_eq!(g.recv(), vec![]);
    }
}

#[test]
fn guest_initiated_stream_reaches_a_host_listener() {
    let mut g = Guest::new(false);
    let listener = UnixListener::bind(format!("{}_5000", g.path.display())).unwrap();
    g.send(&Pkt::from_guest(40000, 5000, OP_REQUEST, &[]));
    let pkts = g.recv();
    assert_eq!(pkts.len(), 1);
    assert_eq!(
        (pkts[0].op, pkts[0].src_port, pkts[0].dst_port),
        (OP_RESPONSE, 5000, 40000)
    );
    let (mut conn, _) = listener.accept().unwrap();
    g.send(&Pkt::from_guest(40000, 5000, OP_RW, b"hello host"));
    let mut buf = [0u8; 10];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    conn.write_all(b"hello guest").unwrap();
    let pkts = g.recv();
    assert_eq!(pkts[0].data, b"hello guest");

    // Nobody listens on 5001: refused.
    g.send(&Pkt::from_guest(40001, 5001, OP_REQUEST, &[]));
    let pkts = g.recv();
    assert_eq!((pkts[0].op, pkts[0].dst_port), (OP_RST, 40001));

    // The guest closes: the host sees EOF.
    g.send(&Pkt {
        flags: 3,
        ..Pkt::from_guest(40000, 5000, OP_SHUTDOWN, &[])
    });
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn hostile_packets_are_refused_and_the_device_keeps_working() {
    let mut g = Guest::new(false);
    let good = Pkt::from_guest(1024, 5555, OP_RW, b"data");
    // Header cut short.
    g.send_raw(&good.encode(4)[..20], false);
    // Length field larger than the buffer, and larger than any packet.
    g.send_raw(&good.encode(4096), false);
    g.send_raw(&good.encode(u32::MAX), true);
    // Zero-length descriptor.
    g.d.write_chain(TX, 0, &[(TX_BUF, 0, false)]);
    g.d.submit(TX, 0);
    // Write-only TX buffer, and one outside guest memory.
    g.d.write_chain(TX, 0, &[(TX_BUF, 64, true)]);
    g.d.submit(TX, 0);
    g.d.write_chain(TX, 0, &[(MEM_SIZE as u64, 64, false)]);
    g.d.submit(TX, 0);
    // Wrong source CID (spoofing another VM) and a packet for the host's
    // CID from a port with no connection: both answered with RST.
    g.send(&Pkt {
        src_cid: 99,
        ..good.clone()
    });
    g.send(&good);
    let pkts = g.recv();
    assert!(pkts.iter().all(|p| p.op == OP_RST), "{pkts:?}");
    assert_eq!(pkts.len(), 2);
    assert_eq!(g.d.status() & STATUS_NEEDS_RESET, 0);

    // RX buffers that are unusable: read-only, too small for a header.
    g.d.write_chain(RX, 30, &[(RX_BUFS, 4096, false)]);
    g.d.submit(RX, 30);
    g.d.write_chain(RX, 31, &[(RX_BUFS, 8, true)]);
    g.d.submit(RX, 31);
    // Still fully functional.
    let (mut host, _) = establish(&mut g);
    host.write_all(b"still alive").unwrap();
    let data: Vec<u8> = g.recv().into_iter().flat_map(|p| p.data).collect();
    assert_eq!(data, b"still alive");
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut g = Guest::new(false);
    let listener = UnixListener::bind(format!("{}_6000", g.path.display())).unwrap();
    g.send(&Pkt::from_guest(40000, 6000, OP_REQUEST, &[]));
    assert_eq!(g.recv()[0].op, OP_RESPONSE);
    let (_conn, _) = listener.accept().unwrap();
    // The host never reads; the guest ignores the advertised 256 KiB.
    let chunk = vec![7u8; 4000];
    let mut reset = false;
    for _ in 0..2000 {
        g.send(&Pkt::from_guest(40000, 6000, OP_RW, &chunk));
        if g.recv().iter().any(|p| p.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest overrunning its credit is disconnected");
}

#[test]
fn malformed_connect_lines_are_dropped() {
    let mut g = Guest::new(false);
    for line in ["HELLO\n", "CONNECT abc\n", "CONNECT 99999999999999\n"] {
        let mut s = UnixStream::connect(&g.path).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        g.recv();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty(), "{line:?} closed without reply");
    }
    // An endless line without newline is cut off too.
    let mut s = UnixStream::connect(&g.path).unwrap();
    s.write_all(&[b'C'; 100]).unwrap();
    g.recv();
    let mut buf = Vec::new();
    // Closed with our bytes unread: EOF or a reset, never a reply.
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty());
    assert!(g.recv().is_empty(), "no request reached the guest");
}

/// Counts the device's answers to connection requests: accepted (RESPONSE)
/// or refused (RST); anything else is a bug.
fn count_answers(pkts: Vec<Pkt>, responses: &mut u32, resets: &mut u32) {
    for p in pkts {
        match p.op {
            OP_RESPONSE => *responses += 1,
            OP_RST => *resets += 1,
            other => panic!("unexpected op {other}"),
        }
    }
}

/// A host listener that never accepts fills its backlog; further guest
/// connections are refused at once instead of blocking the device's
/// event loop (which would stall every device of the VM).
#[test]
fn a_full_host_backlog_refuses_instead_of_blocking() {
    use std::os::fd::AsRawFd;
    let mut g = Guest::new(false);
    let listener = UnixListener::bind(format!("{}_7000", g.path.display())).unwrap();
    // SAFETY: re-listening on a socket we own, only to shrink its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
    let (mut responses, mut resets) = (0, 0);
    for i in 0..20u32 {
        g.send(&Pkt::from_guest(50000 + i, 7000, OP_REQUEST, &[]));
        count_answers(g.recv(), &mut responses, &mut resets);
    }
    assert!(responses > 0, "the backlog took some connections");
    assert!(resets >= 15, "the rest were refused ({resets})");
    assert_eq!(responses + resets, 20);
}

/// However many connections the guest opens, the host keeps at most a
/// bounded number of descriptors (and buffers) for them.
#[test]
fn guest_connections_are_capped() {
    let mut g = Guest::new(false);
    let listener = UnixListener::bind(format!("{}_7001", g.path.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    let (mut responses, mut resets) = (0, 0);
    for i in 0..200u32 {
        g.send(&Pkt::from_guest(10000 + i, 7001, OP_REQUEST, &[]));
        count_answers(g.recv(), &mut responses, &mut resets);
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
    }
    let cap = devices::virtio::vsock::muxer::MAX_GUEST_CONNECTIONS as u32;
    assert_eq!(responses, cap, "the cap");
    assert_eq!(resets, 200 - cap);
    // Host connections are not held up by the guest's.
    let (_host, _) = establish(&mut g);
}

/// Reads what the device forwards to `conn` until end-of-file, running the
/// device's event loop in between (it runs on this thread).
fn read_host_until_eof(g: &mut Guest, conn: &mut UnixStream) -> Vec<u8> {
    conn.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle = 0;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                idle = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                idle += 1;
                assert!(idle < 1000, "no end-of-file after {} bytes", got.len());
                g.d.run();
            }
            Err(e) => panic!("host read failed after {} bytes: {e}", got.len()),
        }
    }
}

/// Guest data the host has not read yet when the guest stops sending, or
/// closes altogether, still reaches the host before its end-of-file.
#[test]
fn data_for_a_slow_host_survives_the_guests_close() {
    for (i, flags) in [SHUTDOWN_SEND, SHUTDOWN_RCV | SHUTDOWN_SEND]
        .into_iter()
        .enumerate()
    {
        let mut g = Guest::new(false);
        let port = 6100 + i as u32;
        let listener = UnixListener::bind(format!("{}_{port}", g.path.display())).unwrap();
        g.send(&Pkt::from_guest(41000, port, OP_REQUEST, &[]));
        assert_eq!(g.recv()[0].op, OP_RESPONSE);
        let (mut conn, _) = listener.accept().unwrap();
        // More than a Unix socket holds (about 200 KiB), within the
        // 256 KiB the device buffers: the rest waits in the device.
        let data: Vec<u8> = (0..384_000u32).map(|n| (n % 251) as u8).collect();
        for chunk in data.chunks(64_000) {
            g.send(&Pkt::from_guest(41000, port, OP_RW, chunk));
        }
        g.send(&Pkt {
            flags,
            ..Pkt::from_guest(41000, port, OP_SHUTDOWN, &[])
        });
        let pkts = g.recv();
        if flags == SHUTDOWN_RCV | SHUTDOWN_SEND {
            assert!(
                pkts.iter().any(|p| p.op == OP_RST && p.dst_port == 41000),
                "a full close completes at once: {pkts:?}"
            );
        }
        let got = read_host_until_eof(&mut g, &mut conn);
        assert_eq!(got.len(), data.len(), "flags {flags}");
        assert!(got == data, "flags {flags}: content differs");
        if flags == SHUTDOWN_SEND {
            // Only the guest's sending ended: the host still talks to it.
            conn.set_nonblocking(false).unwrap();
            conn.write_all(b"late reply").unwrap();
            let pkts = g.recv();
            assert!(
                pkts.iter()
                    .any(|p| p.op == OP_RW && p.data == b"late reply"),
                "{pkts:?}"
            );
        }
    }
}

/// A host that stops sending but still reads (a half-close) is reported
/// as such: the guest keeps sending until it closes too.
#[test]
fn a_host_half_close_leaves_the_guest_sending() {
    let mut g = Guest::new(false);
    let (mut host, local) = establish(&mut g);
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let pkts = g.recv();
    assert!(
        pkts.iter()
            .any(|p| p.op == OP_SHUTDOWN && p.flags == SHUTDOWN_SEND),
        "{pkts:?}"
    );
    g.send(&Pkt::from_guest(1024, local, OP_RW, b"still talking"));
    let mut buf = [0u8; 13];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still talking");
    // The guest finishes as well: it hears RST, the host end-of-file.
    g.send(&Pkt {
        flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
        ..Pkt::from_guest(1024, local, OP_SHUTDOWN, &[])
    });
    assert!(g.recv().iter().any(|p| p.op == OP_RST));
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_reset_device_drops_its_connections_and_starts_again() {
    let mut g = Guest::new(false);
    let (mut host, _) = establish(&mut g);
    g.d.reset();
    // The host side of the old connection sees the end.
    host.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        host.read(&mut buf).unwrap(),
        0,
        "end-of-file after the reset"
    );
    // The driver sets the device up again; it works as new.
    g.d.set_up(16, RINGS_BASE + 0x80_0000);
    assert_eq!(g.d.status() & STATUS_NEEDS_RESET, 0);
    g.rx_seen = 0;
    for slot in 0..8 {
        g.post_rx(slot);
    }
    let (mut host, local) = establish(&mut g);
    g.send(&Pkt::from_guest(1024, local, OP_RW, b"again"));
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");
}

/// The guest's connections cannot survive a restore (their host ends
/// belong to another process): a restored device resets each one first,
/// ahead of a host connection made at once, which gets a port the old
/// ones never had.
#[test]
fn a_restored_device_resets_the_old_connections_before_anything_new() {
    use devices::virtio::persist::{RestoreContext, SaveContext};
    let mut g = Guest::new(false);
    let (_host, local) = establish(&mut g);
    let listener = UnixListener::bind(format!("{}_5000", g.path.display())).unwrap();
    g.send(&Pkt::from_guest(40000, 5000, OP_REQUEST, &[]));
    assert_eq!(g.recv()[0].op, OP_RESPONSE);
    let _guest_side = listener.accept().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let saved = devices::bus::lock(g.d.transport.device())
        .save(&SaveContext {
            snapshot_dir: dir.path(),
            work_dir: dir.path(),
            index: 0,
        })
        .unwrap();
    let path = dir.path().join("restored.sock");
    let restored = Vsock::restore(
        &saved,
        &RestoreContext {
            snapshot_dir: dir.path(),
            work_dir: dir.path(),
            index: 0,
            external: None,
            vsock_path: &path,
            flush: Default::default(),
        },
    )
    .unwrap();
    let mut r = Guest {
        d: Driver::new(restored, 16),
        path,
        _dir: dir,
        split_rx: false,
        rx_seen: 0,
    };
    for slot in 0..8 {
        r.post_rx(slot);
    }
    let _new_host = host_connect(&r.path, 1024);
    let pkts = r.recv();
    let ops: Vec<(u16, u32, u32)> = pkts
        .iter()
        .map(|p| (p.op, p.src_port, p.dst_port))
        .collect();
    assert_eq!(ops.len(), 3, "{pkts:?}");
    let mut resets = ops[..2].to_vec();
    resets.sort();
    assert_eq!(resets, vec![(OP_RST, 5000, 40000), (OP_RST, local, 1024)]);
    let (op, new_local, port) = ops[2];
    assert_eq!(
        (op, port),
        (OP_REQUEST, 1024),
        "the new connection comes last"
    );
    assert!(new_local > local, "a port the old connections never had");
}
