//! Pausing and resuming a running VM.

use std::time::Duration;

use super::Vm;
use crate::error::{Error, Result};

impl Vm {
    /// Stops every vCPU and the device event loop. The guest's clock does
    /// not advance while it is paused.
    pub fn pause(&mut self) -> Result<()> {
        if self.paused {
            return Ok(());
        }
        if let Some(exit) = self.exit.get() {
            return Err(Error::NotRunning(exit.to_string()));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Err(e) = v.pause() {
                // Do not leave the VM half paused: this vCPU's pause is
                // still queued, so it gets a resume too.
                for v in &self.vcpus[..=i] {
                    let _ = v.resume();
                }
                return Err(e);
            }
        }
        self.paused = true;
        self.gate.request();
        let _ = self.wake.write(1);
        if !self.gate.wait_parked(Duration::from_secs(5)) {
            let _ = self.resume();
            return Err(Error::NotRunning(
                "the device event loop did not pause".into(),
            ));
        }
        Ok(())
    }

    /// Runs a paused VM (or one started paused) again.
    pub fn resume(&mut self) -> Result<()> {
        if !self.paused {
            return Ok(());
        }
        self.gate.release();
        for v in &self.vcpus {
            v.resume()?;
        }
        self.paused = false;
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }
}
