//! Taking on a new identity after a restore: every fork of a snapshot
//! wakes up with the same kernel RNG state, hostname, machine id and a
//! wall clock that stood still while it was saved.

use guest_agent::protocol::Identity;

use crate::sys;

/// Most entropy accepted in one notice.
const MAX_ENTROPY: usize = 512;

/// Applies what `identity` asks for; returns what could not be applied.
/// The clock and the RNG come first: user code that runs next must see
/// neither a stale time nor its sibling's random numbers.
pub fn apply(identity: &Identity) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(ns) = identity.unix_time_ns {
        if let Err(e) = sys::set_realtime(ns) {
            problems.push(format!("setting the clock: {e}"));
        }
    }
    if !identity.entropy_hex.is_empty() {
        match decode_hex(&identity.entropy_hex) {
            Some(seed) if seed.len() <= MAX_ENTROPY => {
                if let Err(e) = sys::reseed_kernel_rng(&seed) {
                    problems.push(format!("reseeding the kernel RNG: {e}"));
                }
            }
            _ => problems.push(format!(
                "entropy must be at most {MAX_ENTROPY} hex-encoded bytes"
            )),
        }
    }
    if let Some(name) = &identity.hostname {
        if !valid_hostname(name) {
            problems.push(format!("invalid hostname {name:?}"));
        } else if let Err(e) = sys::sethostname(name) {
            problems.push(format!("setting the hostname: {e}"));
        }
    }
    if let Some(id) = &identity.machine_id {
        if id.len() != 32 || decode_hex(id).is_none() {
            problems.push(format!("invalid machine id {id:?}"));
        } else if let Err(e) = write_machine_id(id) {
            problems.push(format!("writing /etc/machine-id: {e}"));
        }
    }
    problems
}

fn write_machine_id(id: &str) -> std::io::Result<()> {
    std::fs::create_dir_all("/etc")?;
    std::fs::write("/etc/machine-id", format!("{id}\n"))
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_hostnames() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é1"), None);
        assert!(valid_hostname("fork-3.capsule"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname(&"x".repeat(65)));
    }
}
