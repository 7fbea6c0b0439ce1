//! Just enough of the i8042 keyboard controller for a guest to reset the
//! machine (Linux's `reboot=k`): writing 0xFE to the command port pulses the
//! CPU reset line, which the VMM takes as the end of the VM.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    /// `reset` is signalled when the guest resets the machine.
    pub fn new(reset: EventFd) -> Self {
        I8042 { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty, so the kernel's
        // i8042 probe finds nothing and does not wait.
        let value = match offset {
            DATA | COMMAND => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset.write(1) {
                crate::guest_error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_nothing_else_does() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(DATA, &[CMD_RESET_CPU]);
        dev.write(COMMAND, &[0x20]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [1u8];
        dev.read(COMMAND, &mut b);
        assert_eq!(b, [0]);
    }
}
