//! A sandbox's exposed ports while it runs: a listener on the host's
//! loopback per guest port, each TCP connection it takes carried over
//! the agent to the guest's loopback (no guest network device needed).
//! The forwards belong to the sandbox's [`Live`]: closed when it is
//! suspended or ends, opened again (on the same host port when it is
//! free) when it resumes or the daemon adopts it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use sandbox::PortStream;

use super::supervisor::{LifecycleError, Live};
use crate::store::{PortRecord, StoreError};

/// Connections one sandbox's forwards carry at once (each is a stream on
/// the agent's connection, which serves 256).
const MAX_CONNECTIONS: usize = 128;

/// The open forwards of one running sandbox, by guest port.
#[derive(Default)]
pub struct PortForwards {
    open: Mutex<BTreeMap<u16, Forward>>,
    connections: Arc<AtomicUsize>,
}

struct Forward {
    listener: Arc<TcpListener>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        // Wakes the accept thread, which then ends (its clone of the
        // listener with it).
        // SAFETY: a plain syscall on a listening socket this owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

impl PortForwards {
    /// Opens guest `port` of `live` on the host's loopback, on
    /// `host_port` if it is free (0, or taken: any free one). Returns the
    /// host address. A port already open is returned as it is.
    pub fn open(&self, live: &Arc<Live>, port: u16, host_port: u16) -> std::io::Result<SocketAddr> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&port) {
            return f.listener.local_addr();
        }
        let listener = TcpListener::bind(("127.0.0.1", host_port))
            .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let accepting = Arc::clone(&listener);
        let live = Arc::downgrade(live);
        let connections = Arc::clone(&self.connections);
        std::thread::Builder::new()
            .name(format!("port-{port}"))
            .spawn(move || accept_loop(&accepting, &live, port, &connections))?;
        open.insert(port, Forward { listener });
        Ok(addr)
    }

    /// Closes guest `port`'s forward (connections under way go on).
    pub fn close(&self, port: u16) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&port);
    }

    /// Closes every forward.
    pub fn close_all(&self) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The host address of guest `port`'s forward, if open.
    pub fn address(&self, port: u16) -> Option<SocketAddr> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&port).and_then(|f| f.listener.local_addr().ok())
    }
}

fn accept_loop(
    listener: &TcpListener,
    live: &Weak<Live>,
    port: u16,
    connections: &Arc<AtomicUsize>,
) {
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            // Shut down: the forward was closed.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            // Out of descriptors, or a connection gone before it was
            // taken: the forward stays, and does not spin.
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let Some(live) = live.upgrade() else {
            return;
        };
        if connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            connections.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("port {port}: {MAX_CONNECTIONS} connections already open; one refused");
            continue;
        }
        let connections = Arc::clone(connections);
        let spawned = std::thread::Builder::new()
            .name(format!("port-{port}-conn"))
            .spawn(move || {
                carry(client, &live, port);
                connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("port {port}: cannot start a thread; a connection refused");
        }
    }
}

/// Carries one TCP connection to guest `port` and back until both sides
/// have closed.
fn carry(client: TcpStream, live: &Live, port: u16) {
    match live.agent.connect_port(port) {
        Ok(guest) => bridge(client, guest, &[]),
        // A forward has no way to say why: the client sees a close.
        Err(e) => tracing::debug!("port {port}: the guest did not take a connection: {e}"),
    }
}

/// Carries bytes between a host TCP connection and a guest port's
/// stream, `prefix` (what was already read from the client) first, until
/// the guest's side closes.
pub fn bridge(client: TcpStream, mut from_guest: PortStream, prefix: &[u8]) {
    let mut to_guest = from_guest.writer();
    if to_guest.write_all(prefix).is_err() {
        return;
    }
    let Ok(mut client_in) = client.try_clone() else {
        return;
    };
    let upstream = std::thread::Builder::new()
        .name("port-up".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match client_in.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_guest.write_all(&buf[..n]).is_err() {
                            let _ = client_in.shutdown(Shutdown::Read);
                            return;
                        }
                    }
                }
            }
            let _ = to_guest.shutdown();
        });
    let mut client_out = client;
    let _ = std::io::copy(&mut from_guest, &mut client_out);
    // The guest's side is closed: so is the connection (which also ends
    // the other direction's read).
    let _ = client_out.shutdown(Shutdown::Both);
    if let Ok(upstream) = upstream {
        let _ = upstream.join();
    }
}

impl super::supervisor::Supervisor {
    /// Exposes guest `port` of running sandbox `id` on the host's
    /// loopback (the same address again if it already is); kept across
    /// suspend and resume until unexposed or the sandbox ends.
    pub fn expose_port(&self, id: &str, port: u16) -> Result<PortRecord, LifecycleError> {
        let live = self.live(id).ok_or_else(|| {
            let state = self.store().sandbox(id).map(|r| r.state);
            match state {
                Ok(state) => LifecycleError::Store(StoreError::Conflict(format!(
                    "sandbox {id} is {state}, not running"
                ))),
                Err(e) => LifecycleError::Store(e),
            }
        })?;
        if let (Some(addr), Some(record)) = (live.ports.address(port), self.store().port(id, port)?)
        {
            if addr.port() == record.host_port {
                return Ok(record);
            }
        }
        let addr = live
            .ports
            .open(&live, port, 0)
            .map_err(|e| LifecycleError::Failed(format!("cannot listen for port {port}: {e}")))?;
        match self.store().put_port(id, port, addr.port()) {
            Ok(record) => {
                tracing::info!(sandbox = %id, "port {port} exposed at {addr}");
                Ok(record)
            }
            Err(e) => {
                live.ports.close(port);
                Err(e.into())
            }
        }
    }

    /// Stops exposing guest `port` of sandbox `id`.
    pub fn unexpose_port(&self, id: &str, port: u16) -> Result<(), LifecycleError> {
        self.store().delete_port(id, port)?;
        if let Some(live) = self.live(id) {
            live.ports.close(port);
        }
        Ok(())
    }

    /// Opens the recorded forwards of sandbox `id`, just resumed or
    /// adopted, each on its recorded host port if it is still free.
    pub(super) fn open_ports(&self, id: &str, live: &Arc<Live>) {
        let records = match self.store().ports(id) {
            Ok(records) => records,
            Err(e) => {
                tracing::warn!(sandbox = %id, "its exposed ports could not be read: {e}");
                return;
            }
        };
        for record in records {
            match live.ports.open(live, record.port, record.host_port) {
                Ok(addr) if addr.port() != record.host_port => {
                    tracing::warn!(
                        sandbox = %id,
                        "port {}: host port {} is taken; now at {addr}",
                        record.port,
                        record.host_port
                    );
                    let _ = self.store().put_port(id, record.port, addr.port());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(sandbox = %id, "port {} could not be opened: {e}", record.port)
                }
            }
        }
    }
}
