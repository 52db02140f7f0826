//! The i8042 keyboard controller, for one command only: CPU reset (0xfe to
//! port 0x64), which is how Linux with `reboot=k` asks to restart. We turn
//! the reset into a clean VMM exit, as Firecracker does.

use std::sync::Arc;

use super::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60 (data) through 0x64 (command/status).
pub const I8042_PORT_LEN: u64 = 5;

/// Reports a guest reset when vm-superio's i8042 triggers.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.report(VmExit::Reset);
        Ok(())
    }
}

pub struct I8042Device(vm_superio::I8042Device<ResetTrigger>);

impl I8042Device {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self(vm_superio::I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(offset), 1) => data[0] = self.0.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            // The trigger is infallible: the reset is recorded in any case.
            let _ = self.0.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_command_reports_clean_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042Device::new(exit.clone());
        dev.write(4, &[0xfe]);
        assert!(exit.has_exited());
        assert_eq!(exit.wait(), VmExit::Reset);
    }

    #[test]
    fn i8042_other_commands_do_not_exit() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut dev = I8042Device::new(exit.clone());
        dev.write(4, &[0xaa]);
        dev.write(0, &[0xfe]);
        let mut status = [0u8];
        dev.read(4, &mut status);
        assert!(!exit.has_exited());
    }
}
