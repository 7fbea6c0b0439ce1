//! The 16550 UART at 0x3f8 (COM1), the guest's console.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// vm-superio's interrupt trigger, backed by an eventfd registered as an
/// irqfd so raising the interrupt never leaves the kernel.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(EventFdTrigger(interrupt), out),
        }
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.inner.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.inner.write(offset as u8, data[0]) {
            // A console sink that fails (a closed terminal) must not stop
            // the guest.
            log::debug!("serial: {e:?}");
        }
    }
}
