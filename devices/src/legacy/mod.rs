//! The legacy PC devices a Linux guest needs: a serial console and the
//! i8042 controller's reset line.

mod i8042;
mod serial;

pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial, SerialSnapshot};
