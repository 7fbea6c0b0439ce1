//! A running sandbox: its VM, the agent connection, and what it knows of
//! the guest.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_agent::{AgentClient, ExecRequest, Output};
use vmm::{KvmFlavor, RestoreTimings, SnapshotStats, Vm, VmExit, PVM_HINT};

use crate::machine::Machine;

use crate::builder::SandboxBuilder;
use crate::error::{Error, Result};
use crate::guest::GuestInfo;
use crate::ready::{connect_agent_by, wait_for_agent, AgentWait, ReadyListener};

/// How long connecting to the agent may take once it said it is ready.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time a guest that just announced its agent gets to answer
/// on the agent port, however late in the ready timeout it announced.
const AGENT_ANSWER_MIN: Duration = Duration::from_secs(5);
/// How long the agent has to agree to power off.
const SHUTDOWN_ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// A sandbox over a machine: a VM in this process by default, or one in
/// a `capsule-vmm` child ([`crate::ChildVm`]).
pub struct Sandbox<M: Machine = Vm> {
    // First: the agent's threads end before the VM's host side closes.
    pub(crate) agent: Option<AgentClient>,
    /// Open until the agent announced itself, then closed so the guest
    /// cannot pile connections onto a socket nobody accepts from.
    pub(crate) ready_listener: Option<ReadyListener>,
    pub(crate) ready_after: Option<Duration>,
    pub(crate) guest: GuestInfo,
    pub(crate) restore_timings: Option<RestoreTimings>,
    /// The answer to the identity a restore sent, until it comes.
    pub(crate) identity_pending: Option<guest_agent::PendingRestored>,
    pub(crate) vm: M,
}

/// Opens a connection to the guest agent of a VM whose vsock device
/// listens on `vsock_path` ([`Vm::vsock_path`]), possibly from another
/// process than the one running the VM.
pub fn connect_agent(vsock_path: &Path) -> Result<AgentClient> {
    connect_agent_by(vsock_path, Instant::now() + AGENT_CONNECT_TIMEOUT)
}

impl Sandbox {
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }
}

impl<M: Machine> Sandbox<M> {
    pub(crate) fn new(vm: M, guest: GuestInfo, ready_listener: Option<ReadyListener>) -> Self {
        Sandbox {
            agent: None,
            ready_listener,
            ready_after: None,
            guest,
            restore_timings: None,
            identity_pending: None,
            vm,
        }
    }

    /// A sandbox over `machine`, just booted from
    /// [`SandboxBuilder::vm_config`] and still paused: the ready socket
    /// listens before the guest runs.
    pub fn adopt_booted(mut machine: M, guest: GuestInfo) -> Result<Sandbox<M>> {
        machine.set_annotation(guest.encode())?;
        let ready = ReadyListener::bind(machine.vsock_path())?;
        machine.resume()?;
        Ok(Sandbox::new(machine, guest, Some(ready)))
    }

    /// The machine under the sandbox.
    pub fn machine(&self) -> &M {
        &self.vm
    }

    pub fn machine_mut(&mut self) -> &mut M {
        &mut self.vm
    }

    /// The machine, leaving the sandbox (a kept child goes on running).
    pub fn into_machine(self) -> M {
        self.vm
    }

    /// The machine and the agent connection, if one is open. After a
    /// restore that is the connection the guest's new identity went out
    /// on: the agent takes a connection's requests in order, so commands
    /// sent on it run only once the clock, RNG and hostname are the
    /// fork's own. A new connection promises no such thing.
    pub fn into_parts(mut self) -> (M, Option<AgentClient>) {
        self.collect_identity_answer();
        let agent = self.agent.take();
        (self.vm, agent)
    }

    pub fn guest(&self) -> &GuestInfo {
        &self.guest
    }

    pub fn hostname(&self) -> &str {
        &self.guest.hostname
    }

    /// Time from `boot()` (or `restore()`) to the agent's ready signal,
    /// once seen.
    pub fn ready_after(&self) -> Option<Duration> {
        self.ready_after
    }

    /// Where a restore's time went, the VM's phases and the agent's.
    pub fn restore_timings(&self) -> Option<&RestoreTimings> {
        self.restore_timings.as_ref()
    }

    pub(crate) fn update_guest(&mut self, update: impl FnOnce(&mut GuestInfo)) -> Result<()> {
        update(&mut self.guest);
        self.vm.set_annotation(self.guest.encode())
    }

    /// Waits for the guest agent's ready signal; ready means the agent
    /// answered its hello.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        if let Some(d) = self.ready_after {
            return Ok(d);
        }
        let deadline = Instant::now() + timeout;
        let Some(listener) = self.ready_listener.as_ref() else {
            return Err(Error::Config(
                "the ready signal was already consumed".into(),
            ));
        };
        let vsock = self.vm.vsock_path().to_path_buf();
        let vm = &self.vm;
        let waited = wait_for_agent(listener, &vsock, deadline, AGENT_ANSWER_MIN, || {
            vm.exit_reason().is_some()
        })?;
        let after = self.vm.started_at().elapsed();
        match waited {
            AgentWait::Ready(agent) => self.agent = Some(agent),
            AgentWait::Stopped => {
                let exit = self.vm.exit_reason().unwrap_or(VmExit::Stopped);
                return Err(self.exit_error(exit));
            }
            AgentWait::TimedOut => {
                let hint = if self.vm.kvm_flavor() == KvmFlavor::Pvm {
                    format!("\n{PVM_HINT}")
                } else {
                    String::new()
                };
                return Err(Error::NotReady {
                    seconds: timeout.as_secs_f64(),
                    console: format!("{}{hint}", self.vm.console_tail(20)),
                });
            }
            AgentWait::Silent(e) => {
                // The signal is spent either way: nothing more to wait for.
                self.ready_listener = None;
                if let Some(exit) = self.vm.exit_reason() {
                    return Err(self.exit_error(exit));
                }
                return Err(Error::NotReady {
                    seconds: after.as_secs_f64(),
                    console: format!(
                        "(the guest said its agent was ready, then the agent did not answer: {e})\n{}",
                        self.vm.console_tail(20)
                    ),
                });
            }
        }
        // Closed now, so the guest cannot pile connections onto a socket
        // nobody accepts from.
        self.ready_listener = None;
        self.ready_after = Some(after);
        self.update_guest(|g| g.agent_ready = true)?;
        Ok(after)
    }

    /// How the VM ended, as an error of a guest that never got ready.
    pub(crate) fn exit_error(&self, exit: VmExit) -> Error {
        match self.vm.exit_error(exit) {
            Error::Vm(vmm::Error::Stopped { exit, console }) => {
                Error::StoppedBeforeReady { exit, console }
            }
            other => other,
        }
    }

    /// The connection to the guest agent (opened on first use, and again
    /// if the last one was lost).
    pub fn agent(&mut self) -> Result<&AgentClient> {
        self.collect_identity_answer();
        if self
            .agent
            .as_ref()
            .is_some_and(|a| a.check_alive().is_err())
        {
            self.agent = None;
        }
        if self.agent.is_none() {
            self.agent = Some(connect_agent(self.vm.vsock_path())?);
        }
        Ok(self.agent.as_ref().expect("just connected"))
    }

    /// Reports what a restored guest could not apply of its identity, once
    /// it has said.
    fn collect_identity_answer(&mut self) {
        let Some(answer) = self.identity_pending.as_ref().and_then(|p| p.try_take()) else {
            return;
        };
        self.identity_pending = None;
        match answer {
            Ok(problems) => {
                // The guest writes these: a few, each cut short.
                for p in problems.iter().take(4) {
                    let p: String = p.chars().take(200).collect();
                    devices::guest_warn!("restore: the guest could not apply its identity: {p}");
                }
            }
            Err(e) => log::warn!("restore: the guest did not take its identity: {e}"),
        }
    }

    /// Runs a command to completion and collects its output.
    pub fn exec<I, S>(&mut self, argv: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Ok(self.agent()?.exec(ExecRequest::new(argv))?.output()?)
    }

    /// Asks the agent to power off cleanly (flushing disks), waits up to
    /// `timeout`, then stops the VM regardless.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<VmExit> {
        // Only a guest whose agent announced itself can be asked; asking
        // one that never did would just wait for the connect timeout.
        if self.vm.exit_reason().is_none() && self.guest.agent_ready {
            let asked = self
                .agent()
                .and_then(|a| Ok(a.shutdown(false, SHUTDOWN_ASK_TIMEOUT.min(timeout))?));
            if let Err(e) = asked {
                log::warn!("clean shutdown request failed: {e}");
            }
        }
        let exit = self.vm.wait(Some(timeout));
        self.agent = None;
        Ok(exit.unwrap_or_else(|| self.vm.kill()))
    }

    /// Stops the VM immediately.
    pub fn kill(&mut self) -> VmExit {
        self.agent = None;
        self.vm.kill()
    }

    /// Waits for the VM to stop on its own.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        self.vm.wait(timeout)
    }

    /// A snapshot of the sandbox (see [`Vm::snapshot`]); what the sandbox
    /// knows of its guest goes with it.
    pub fn snapshot(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.vm.snapshot(dir.as_ref(), false)
    }

    /// A diff snapshot (see [`Vm::snapshot_diff`]).
    pub fn snapshot_diff(&mut self, dir: impl AsRef<Path>) -> Result<SnapshotStats> {
        self.vm.snapshot(dir.as_ref(), true)
    }

    pub fn pause(&mut self) -> Result<()> {
        self.vm.pause()
    }

    pub fn resume(&mut self) -> Result<()> {
        self.vm.resume()
    }

    pub fn vsock_path(&self) -> &Path {
        self.vm.vsock_path()
    }

    pub fn console_tail(&self, lines: usize) -> String {
        self.vm.console_tail(lines)
    }

    pub fn stall_report(&self) -> String {
        self.vm.stall_report()
    }

    pub fn exit_reason(&self) -> Option<VmExit> {
        self.vm.exit_reason()
    }
}
