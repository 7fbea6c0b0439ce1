//! Bringing a sandbox back from a snapshot: the VM restored (paused), the
//! ready socket bound if the agent had yet to announce itself, and
//! otherwise the agent reconnected and told who it is now.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::{ClientOptions, Identity};
use vmm::{RestoreTimings, Vm};

use crate::machine::Machine;

use crate::error::{Error, Result};
use crate::guest::GuestInfo;
use crate::ready::{connect_agent_with, ReadyListener};
use crate::sandbox::Sandbox;

/// How long a restored guest may take, by default, to come back: accept
/// the agent connection and apply its identity. Generous: dozens of forks
/// resuming at once on a busy host all do this first.
pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// How to restore a sandbox.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The VM's part: memory backend, directories, the raw image under
    /// each of the snapshot's disks (the root filesystem first), flush
    /// policy. It is always restored paused, then resumed here.
    pub vm: vmm::RestoreOptions,
    /// Hostname and machine id for the restored guest (a fork wants new
    /// ones, see [`crate::fork_identity`]); left as they were if unset.
    /// The guest's wall clock is corrected and its kernel RNG reseeded
    /// from the host on every restore regardless.
    pub identity: Identity,
    /// How long the resumed guest may take to answer its agent (default
    /// [`DEFAULT_RESTORE_TIMEOUT`]); a guest that takes longer fails the
    /// restore and is stopped. Its identity is then sent without waiting:
    /// the agent applies it before anything sent after it, and what it
    /// could not apply is logged when its answer comes.
    pub timeout: Option<Duration>,
}

impl Sandbox {
    /// Restores a sandbox snapshot into a new sandbox in this process and
    /// resumes it; a guest whose agent was ready at the snapshot is ready
    /// again when this returns.
    pub fn restore(dir: impl AsRef<Path>, options: RestoreOptions) -> Result<Sandbox> {
        let started = Instant::now();
        let vm = Vm::restore(
            dir,
            vmm::RestoreOptions {
                start_paused: true,
                ..options.vm.clone()
            },
        )?;
        let annotation = vm.annotation().to_vec();
        let timings = vm.restore_timings().cloned().unwrap_or_default();
        Sandbox::adopt_restored(vm, &annotation, timings, &options, started)
    }
}

impl<M: Machine> Sandbox<M> {
    /// A sandbox over `machine`, just restored (still paused) from a
    /// snapshot whose annotation is `annotation`: resumed, and if its
    /// agent was ready, reconnected and given its identity.
    pub fn adopt_restored(
        machine: M,
        annotation: &[u8],
        mut timings: RestoreTimings,
        options: &RestoreOptions,
        started: Instant,
    ) -> Result<Sandbox<M>> {
        let guest = GuestInfo::decode(annotation)?;
        let ready = if guest.agent_ready {
            None
        } else {
            Some(ReadyListener::bind(machine.vsock_path())?)
        };
        let mut sb = Sandbox::new(machine, guest, ready);
        let lap = Instant::now();
        sb.vm.resume()?;
        timings.phases.push(("resume".into(), lap.elapsed()));
        if sb.guest.agent_ready {
            let lap = Instant::now();
            let deadline = Instant::now() + options.timeout.unwrap_or(DEFAULT_RESTORE_TIMEOUT);
            if let Err(e) = sb.send_identity(options.identity.clone(), deadline) {
                return Err(sb.restore_failed(e, started));
            }
            timings
                .phases
                .push(("agent answers, identity sent".into(), lap.elapsed()));
            sb.ready_after = Some(started.elapsed());
        }
        sb.restore_timings = Some(timings);
        Ok(sb)
    }

    /// Says how a restore failed: how the guest ended if it did, else as
    /// for a boot that never got ready, with the console, which tells a
    /// stalled guest from a crashed one.
    fn restore_failed(&mut self, e: Error, started: Instant) -> Error {
        // A guest that dies while resuming closes its agent connection:
        // say how it ended, not that it closed.
        if let Some(exit) = self.vm.wait(Some(Duration::from_millis(200))) {
            return self.exit_error(exit);
        }
        if !e.is_guest_unresponsive() {
            return e;
        }
        let report = self.vm.stall_report();
        log::warn!("restore: the resumed guest stopped answering ({e}); the VM:\n{report}");
        // Signs that the VMM is at fault go with the error.
        let faults: String = report
            .lines()
            .filter(|l| l.starts_with(vmm::VMM_AT_FAULT))
            .map(|l| format!("{l}\n"))
            .collect();
        match e {
            Error::NotReady { seconds, console } => Error::NotReady {
                seconds,
                console: format!("{faults}{console}"),
            },
            e => Error::NotReady {
                seconds: started.elapsed().as_secs_f64(),
                console: format!("{faults}({e})\n{}", self.vm.console_tail(20)),
            },
        }
    }

    /// Connects to the restored guest's agent and tells it who it is now
    /// and what time it is, and has it reseed its kernel RNG.
    fn send_identity(&mut self, identity: Identity, deadline: Instant) -> Result<()> {
        let identity = crate::identity::complete(identity)?;
        let left = || deadline.saturating_duration_since(Instant::now());
        if self.agent.is_none() {
            // A guest resuming among many on a busy host may take all of
            // the restore's time to answer anything: keepalives must not
            // give up on it sooner.
            let options = ClientOptions {
                keepalive_timeout: left().max(ClientOptions::default().keepalive_timeout),
                ..Default::default()
            };
            self.agent = Some(connect_agent_with(self.vm.vsock_path(), deadline, options)?);
            log::debug!("restore: the agent answered");
        }
        let hostname = identity.hostname.clone();
        let agent = self.agent.as_ref().expect("just connected");
        // Not waited for: the agent applies it before anything sent after
        // it, so the first command needs no round trip of its own.
        self.identity_pending = Some(agent.send_restored(identity)?);
        if let Some(name) = hostname {
            self.update_guest(|g| g.hostname = name)?;
        }
        Ok(())
    }
}
