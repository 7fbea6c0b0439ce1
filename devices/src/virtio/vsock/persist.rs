//! vsock in a snapshot: the guest's connections cannot survive a restore
//! (their host ends belong to another process), so a restored device
//! resets each of them before anything else reaches the guest.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::muxer::ConnKey;
use super::Vsock;
use crate::virtio::persist::{
    decode, encode, Persist, PersistError, RestoreContext, SaveContext, SavedDevice,
};

/// The most connections a snapshot may list: the muxer never holds more.
const MAX_SAVED_CONNECTIONS: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    /// The next port for a host-initiated connection: a restored device
    /// carries on from here, so a new connection never shares a port with
    /// an old one the guest has yet to drop.
    pub next_local_port: u32,
    /// The guest's connections at the snapshot, (host port, guest port).
    pub connections: Vec<(u32, u32)>,
}

impl Persist for Vsock {
    fn save(&mut self, _ctx: &SaveContext) -> Result<SavedDevice, PersistError> {
        let state = VsockState {
            guest_cid: self.guest_cid,
            next_local_port: self.muxer.next_local_port(),
            connections: self
                .muxer
                .guest_connections()
                .into_iter()
                .map(|k| (k.local_port, k.peer_port))
                .collect(),
        };
        Ok(SavedDevice {
            kind: VIRTIO_ID_VSOCK,
            state: encode("vsock", &state)?,
            external: None,
        })
    }
}

impl Vsock {
    /// The device again, its host side listening on `ctx.vsock_path` (a
    /// restored VM gets a new runtime directory); the guest's old
    /// connections are reset first thing.
    pub fn restore(saved: &SavedDevice, ctx: &RestoreContext) -> Result<Vsock, PersistError> {
        let state: VsockState = decode("vsock", &saved.state)?;
        if state.connections.len() > MAX_SAVED_CONNECTIONS || saved.external.is_some() {
            return Err(PersistError::Invalid("implausible vsock state".into()));
        }
        let mut vsock = Vsock::new(state.guest_cid, ctx.vsock_path)?;
        vsock.muxer.continue_local_ports_from(state.next_local_port);
        let stale: Vec<ConnKey> = state
            .connections
            .iter()
            .map(|&(local_port, peer_port)| ConnKey {
                local_port,
                peer_port,
            })
            .collect();
        vsock.muxer.reset_stale(&stale);
        Ok(vsock)
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }
}
