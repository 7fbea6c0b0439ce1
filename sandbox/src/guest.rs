//! What a sandbox knows of its guest, kept with its snapshots (as the
//! VM's annotation) so a restore knows it too.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub hostname: String,
    /// Whether the agent had announced itself: a restored guest can be
    /// talked to at once only if it had.
    pub agent_ready: bool,
    /// The first disk is the root filesystem.
    pub root_on_disk: bool,
}

impl GuestInfo {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a snapshot's annotation: untrusted, so checked.
    pub fn decode(annotation: &[u8]) -> Result<GuestInfo> {
        if annotation.is_empty() {
            return Err(Error::Snapshot(
                "it is not a sandbox's snapshot (it says nothing of a guest agent)".into(),
            ));
        }
        let info: GuestInfo = serde_json::from_slice(annotation)
            .map_err(|e| Error::Snapshot(format!("its sandbox record is malformed: {e}")))?;
        if !valid_hostname(&info.hostname) {
            return Err(Error::Snapshot(format!(
                "invalid hostname {:?}",
                info.hostname
            )));
        }
        Ok(info)
    }
}

/// Whether `name` is a hostname the guest will take: letters, digits,
/// '-' and '.', at most 64 (it goes on the kernel command line at boot).
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
}
