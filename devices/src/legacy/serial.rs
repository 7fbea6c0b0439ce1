//! The 16550 UART at 0x3f8 (COM1), the guest's console.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
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

/// Serializable UART registers and receive FIFO (for snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl Serial {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Self {
        Serial {
            inner: vm_superio::Serial::new(EventFdTrigger(interrupt), out),
        }
    }

    /// A UART in the state a snapshot recorded; refuses an overfull FIFO.
    pub fn restore(
        state: &SerialSnapshot,
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let inner = vm_superio::Serial::from_state(&s, EventFdTrigger(interrupt), NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(Serial { inner })
    }

    pub fn state(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
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
