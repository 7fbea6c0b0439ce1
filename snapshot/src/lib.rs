//! Capsule's snapshot format: a versioned, checksummed container for
//! vCPU, VM and device state ([`container`]: tagged, length-checked,
//! checksummed sections that a corrupt or truncated file cannot get
//! past), full and diff guest-memory files with zero pages left as holes
//! ([`memory`]), and the userfaultfd restore backend ([`uffd`]).

pub mod container;
pub mod memory;
pub mod uffd;

/// First bytes of every Capsule snapshot state file.
pub const MAGIC: [u8; 8] = *b"CAPSNAP\0";

/// Format version written by this build. 2: a snapshot names its own
/// files only (layers by name, a diff's parent in `parent/`), never a
/// path. 3: each device saves its own state (a disk's layers and raw
/// image with it), and the VMM keeps an opaque annotation for the layer
/// above instead of knowing of the guest agent.
pub const FORMAT_VERSION: u32 = 3;
