//! Who a restored guest is now: a hostname and machine id (new ones for a
//! fork), the host's time and fresh entropy.

use std::fs::File;
use std::io::Read;

use capsule_vmm::protocol::to_hex as hex;
use guest_agent::Identity;

use crate::error::Result;

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes))?;
    Ok(bytes)
}

/// A new identity for one fork: `hostname` and a random machine id.
pub fn fork_identity(hostname: impl Into<String>) -> Result<Identity> {
    let id: [u8; 16] = random_bytes()?;
    Ok(Identity {
        hostname: Some(hostname.into()),
        machine_id: Some(hex(&id)),
        ..Identity::default()
    })
}

/// `identity` with what every restore sends: the host's wall clock and a
/// seed for the guest's kernel RNG.
pub(crate) fn complete(mut identity: Identity) -> Result<Identity> {
    let seed: [u8; 64] = random_bytes()?;
    identity.entropy_hex = hex(&seed);
    identity.unix_time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok());
    Ok(identity)
}
