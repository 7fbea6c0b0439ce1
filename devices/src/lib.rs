//! Capsule's devices: the virtio-mmio transport, virtio-blk, virtio-rng and
//! virtio-vsock, and the two legacy devices a Linux guest needs (a 16550
//! serial port and the i8042 reset line).
//!
//! Every byte the guest hands a device is untrusted. A malformed request
//! gets an error status; a malformed queue stops that device (it reports
//! `DEVICE_NEEDS_RESET`), never the VMM.

pub mod bus;
pub mod disk;
pub mod host_file;
pub mod host_socket;
pub mod legacy;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use host_file::HostFile;

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
