//! Capsule's snapshot format (coming with snapshots and forks): a
//! versioned, checksummed container for vCPU, VM and device state plus
//! full and diff guest-memory files, and the restore backends (private
//! file mapping, userfaultfd).
//!
//! So far: the identity every state file starts with, the container
//! ([`container`]): tagged, length-checked, checksummed sections that a
//! corrupt or truncated file cannot get past, and full memory files with
//! zero pages left as holes ([`memory`]).

pub mod container;
pub mod memory;
pub mod uffd;

/// First bytes of every Capsule snapshot state file.
pub const MAGIC: [u8; 8] = *b"CAPSNAP\0";

/// Format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
