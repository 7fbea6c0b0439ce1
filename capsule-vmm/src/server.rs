//! The child's side of the control protocol: one VM, many connections.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use capsule_vmm::channel::{Channel, ChannelError};
use capsule_vmm::protocol::{
    from_hex, to_hex, Answer, BootSpec, Event, Failure, FailureCode, FromChild, Info, MemorySpec,
    Op, Request, RestoreSpec, VmState, CONTROL_SOCKET, PROTOCOL_VERSION,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use vmm::{DiskConfig, HostFile, MemoryBackend, RestoreOptions, Vm, VmConfig};

/// A supervisor that stops reading gets this long per message.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections beyond the first few are refused: a supervisor, a CLI or
/// two, a restarted daemon.
const MAX_CONNECTIONS: usize = 16;

pub struct Server {
    conns: Vec<Channel>,
    listener: OwnedFd,
    vm: Option<Vm>,
    /// Readable once the VM has ended: the thread watching for it
    /// writes to the other end.
    exited: std::io::PipeReader,
    exited_writer: std::io::PipeWriter,
}

fn failure(code: FailureCode, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn vmm_failure(e: vmm::Error) -> Failure {
    failure(FailureCode::Vmm, e.to_string())
}

impl Server {
    pub fn new(control: Channel) -> Result<Server> {
        let listener = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let _ = std::fs::remove_file(CONTROL_SOCKET);
        bind(listener.as_raw_fd(), &UnixAddr::new(CONTROL_SOCKET)?)
            .with_context(|| format!("binding {CONTROL_SOCKET} in the runtime directory"))?;
        // The runtime directory is private already; the socket is too.
        std::fs::set_permissions(
            CONTROL_SOCKET,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        listen(&listener, Backlog::new(4)?)?;
        let (exited, exited_writer) = std::io::pipe()?;
        let mut server = Server {
            conns: Vec::new(),
            listener,
            vm: None,
            exited,
            exited_writer,
        };
        server.add(control)?;
        Ok(server)
    }

    fn add(&mut self, conn: Channel) -> Result<()> {
        conn.set_write_timeout(Some(SEND_TIMEOUT))?;
        let hello = FromChild::Hello {
            protocol: PROTOCOL_VERSION,
            pid: std::process::id(),
            software: format!("capsule-vmm {}", env!("CARGO_PKG_VERSION")),
        };
        if conn.send(&hello, &[]).is_ok() {
            self.conns.push(conn);
        }
        Ok(())
    }

    pub fn run(mut self) -> Result<()> {
        loop {
            // No VM and nobody to ask for one: nothing to keep.
            if self.vm.is_none() && self.conns.is_empty() {
                return Ok(());
            }
            let readable = self.wait()?;
            if readable.exited {
                return self.finish();
            }
            if readable.listener {
                self.accept();
            }
            // Connections that fail are dropped after the round, so every
            // index stays valid through it.
            let mut dead = vec![false; self.conns.len()];
            for i in readable.conns {
                if dead[i] {
                    continue;
                }
                match self.conns[i].recv::<Request>() {
                    Ok((request, fds)) => {
                        let (reply, event) = self.handle(request.op, fds);
                        let reply = FromChild::Reply {
                            id: request.id,
                            result: reply,
                        };
                        if self.conns[i].send(&reply, &[]).is_err() {
                            dead[i] = true;
                        }
                        if let Some(event) = event {
                            self.broadcast(event, &mut dead);
                        }
                    }
                    Err(ChannelError::Malformed(why)) => {
                        let reply = FromChild::Reply {
                            id: 0,
                            result: Err(failure(FailureCode::BadRequest, why)),
                        };
                        if self.conns[i].send(&reply, &[]).is_err() {
                            dead[i] = true;
                        }
                    }
                    Err(ChannelError::TooLarge | ChannelError::TooManyFds) => {
                        log::warn!("dropping a connection that sent an oversized message");
                        dead[i] = true;
                    }
                    Err(_) => dead[i] = true,
                }
            }
            let mut i = 0;
            self.conns.retain(|_| {
                i += 1;
                !dead[i - 1]
            });
        }
    }

    fn wait(&self) -> Result<Readable> {
        let mut fds = vec![
            PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.exited.as_fd(), PollFlags::POLLIN),
        ];
        fds.extend(
            self.conns
                .iter()
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => break,
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        Ok(Readable {
            listener: ready(&fds[0]),
            exited: ready(&fds[1]),
            conns: (0..self.conns.len())
                .filter(|i| ready(&fds[i + 2]))
                .collect(),
        })
    }

    fn accept(&mut self) {
        let Ok(fd) = accept(self.listener.as_raw_fd()) else {
            return;
        };
        // SAFETY: accept just returned this descriptor; nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let trusted = getsockopt(&fd, sockopt::PeerCredentials).is_ok_and(|c| {
            let me = nix::unistd::Uid::effective().as_raw();
            c.uid() == me || c.uid() == 0
        });
        if !trusted {
            log::warn!("refusing a control connection from another user");
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("refusing a control connection: {MAX_CONNECTIONS} are open");
            return;
        }
        if let Err(e) = self.add(Channel::from_fd(fd)) {
            log::warn!("control connection: {e}");
        }
    }

    /// Sends `event` to every connection, marking in `dead` those that
    /// cannot take it.
    fn broadcast(&mut self, event: Event, dead: &mut [bool]) {
        let message = FromChild::Event { event };
        for (conn, dead) in self.conns.iter().zip(dead.iter_mut()) {
            if !*dead && conn.send(&message, &[]).is_err() {
                *dead = true;
            }
        }
    }

    /// The VM has ended: everyone hears why, then the child exits.
    fn finish(mut self) -> Result<()> {
        let reason = self
            .vm
            .as_mut()
            .and_then(|vm| vm.wait(Some(Duration::ZERO)))
            .unwrap_or(vmm::VmExit::Stopped);
        log::info!("the VM ended: {reason}");
        let mut dead = vec![false; self.conns.len()];
        self.broadcast(
            Event::Exited {
                reason: reason.into(),
            },
            &mut dead,
        );
        drop(self.vm.take());
        let _ = std::fs::remove_file(CONTROL_SOCKET);
        Ok(())
    }

    fn handle(&mut self, op: Op, fds: Vec<OwnedFd>) -> (Result<Answer, Failure>, Option<Event>) {
        let built = self.vm.is_some();
        match op {
            Op::Boot(_) | Op::Restore(_) if built => (
                Err(failure(
                    FailureCode::WrongState,
                    "this child already has a VM",
                )),
                None,
            ),
            Op::Boot(spec) => self.built(boot(spec, fds)),
            Op::Restore(spec) => self.built(restore(spec, fds)),
            Op::Info => (Ok(Answer::Info(self.info())), None),
            _ if !fds.is_empty() => (
                Err(failure(
                    FailureCode::BadRequest,
                    "descriptors came with a request that takes none",
                )),
                None,
            ),
            op => match self.vm.as_mut() {
                None => (
                    Err(failure(
                        FailureCode::WrongState,
                        "no VM yet: boot or restore one",
                    )),
                    None,
                ),
                Some(vm) => on_vm(vm, op),
            },
        }
    }

    fn built(&mut self, built: Result<Vm, Failure>) -> (Result<Answer, Failure>, Option<Event>) {
        let vm = match built {
            Ok(vm) => vm,
            Err(f) => return (Err(f), None),
        };
        let answer = Answer::Built {
            annotation_hex: to_hex(vm.annotation()),
            timings: vm
                .restore_timings()
                .map(|t| {
                    t.phases
                        .iter()
                        .map(|(phase, d)| (phase.to_string(), d.as_secs_f64() * 1e3))
                        .collect()
                })
                .unwrap_or_default(),
        };
        // Told when the VM ends, without polling it.
        let watch = vm.exit_watch();
        let mut exited = match self.exited_writer.try_clone() {
            Ok(e) => e,
            Err(e) => return (Err(failure(FailureCode::Vmm, e.to_string())), None),
        };
        let spawned = std::thread::Builder::new()
            .name("exit-watch".into())
            .spawn(move || {
                watch.wait(None);
                let _ = std::io::Write::write_all(&mut exited, b"x");
            });
        if let Err(e) = spawned {
            return (Err(failure(FailureCode::Vmm, e.to_string())), None);
        }
        self.vm = Some(vm);
        (Ok(answer), Some(Event::Ready))
    }

    fn info(&self) -> Info {
        let vm = self.vm.as_ref();
        Info {
            pid: std::process::id(),
            state: vm.map(|vm| match (vm.exit_reason(), vm.is_paused()) {
                (Some(_), _) => VmState::Exited,
                (None, true) => VmState::Paused,
                (None, false) => VmState::Running,
            }),
            annotation_hex: vm.map(|vm| to_hex(vm.annotation())).unwrap_or_default(),
            external_files: vm
                .map(|vm| vm.external_files().to_vec())
                .unwrap_or_default(),
            cpus: vm.map_or(0, |vm| vm.config().cpus),
            memory_mib: vm.map_or(0, |vm| vm.config().memory_mib),
        }
    }
}

struct Readable {
    listener: bool,
    exited: bool,
    conns: Vec<usize>,
}

/// Requests about the VM once it is built.
fn on_vm(vm: &mut Vm, op: Op) -> (Result<Answer, Failure>, Option<Event>) {
    match op {
        Op::Resume => match vm.resume() {
            Ok(()) => (Ok(Answer::Done), Some(Event::Resumed)),
            Err(e) => (Err(vmm_failure(e)), None),
        },
        Op::Pause => match vm.pause() {
            Ok(()) => (Ok(Answer::Done), Some(Event::Paused)),
            Err(e) => (Err(vmm_failure(e)), None),
        },
        Op::Snapshot { dir, diff } => {
            let taken = if diff {
                vm.snapshot_diff(&dir)
            } else {
                vm.snapshot(&dir)
            };
            match taken {
                Ok(stats) => (
                    Ok(Answer::Snapshot {
                        memory_bytes_written: stats.memory_bytes_written,
                        memory_zero_bytes: stats.memory_zero_bytes,
                        paused_ms: stats.paused_for.as_secs_f64() * 1e3,
                        external_files: vm.external_files().to_vec(),
                    }),
                    Some(Event::SnapshotWritten { dir }),
                ),
                Err(e) => (Err(vmm_failure(e)), None),
            }
        }
        Op::SetAnnotation { hex } => match from_hex(&hex) {
            None => (
                Err(failure(
                    FailureCode::BadRequest,
                    "the annotation is not hex",
                )),
                None,
            ),
            Some(bytes) => match vm.set_annotation(bytes) {
                Ok(()) => (Ok(Answer::Done), None),
                Err(e) => (Err(vmm_failure(e)), None),
            },
        },
        Op::ConsoleTail { lines } => (
            Ok(Answer::Text {
                text: vm.console_tail(lines.min(10_000) as usize),
            }),
            None,
        ),
        Op::StallReport => (
            Ok(Answer::Text {
                text: vm.stall_report(),
            }),
            None,
        ),
        Op::Kill => {
            vm.kill();
            (Ok(Answer::Done), None)
        }
        Op::Boot(_) | Op::Restore(_) | Op::Info => unreachable_op(),
    }
}

fn unreachable_op() -> (Result<Answer, Failure>, Option<Event>) {
    (
        Err(failure(
            FailureCode::BadRequest,
            "not a request about the VM",
        )),
        None,
    )
}

fn bad_fds(expected: usize, got: usize) -> Failure {
    failure(
        FailureCode::BadRequest,
        format!("the request needs {expected} descriptors, {got} came"),
    )
}

/// The runtime directory is the working directory.
fn runtime_dir() -> PathBuf {
    PathBuf::from(".")
}

fn boot(spec: BootSpec, fds: Vec<OwnedFd>) -> Result<Vm, Failure> {
    let expected = 1 + usize::from(spec.initramfs) + spec.disks.len();
    if fds.len() != expected {
        return Err(bad_fds(expected, fds.len()));
    }
    let mut fds = fds.into_iter().map(std::fs::File::from);
    let mut next = |name: &str| HostFile::open_file(fds.next().expect("counted"), name);
    let kernel = next("kernel");
    let initramfs = spec.initramfs.then(|| next("initramfs"));
    let disks = spec
        .disks
        .iter()
        .map(|d| DiskConfig {
            file: HostFile::open_file(fds.next().expect("counted"), &d.name),
            read_only: d.read_only,
            flush: d.flush,
        })
        .collect();
    let config = VmConfig {
        kernel,
        initramfs,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        disks,
        cmdline: spec.cmdline,
        verbose_console: spec.verbose_console,
        runtime_dir: Some(runtime_dir()),
        start_paused: true,
        ..VmConfig::default()
    };
    vmm::VmBuilder::from(config).boot().map_err(vmm_failure)
}

fn restore(spec: RestoreSpec, fds: Vec<OwnedFd>) -> Result<Vm, Failure> {
    if fds.len() != spec.disks.len() {
        return Err(bad_fds(spec.disks.len(), fds.len()));
    }
    let disks = fds
        .into_iter()
        .zip(&spec.disks)
        .map(|(fd, name)| HostFile::open_file(std::fs::File::from(fd), name))
        .collect();
    let options = RestoreOptions {
        memory: match spec.memory {
            MemorySpec::File => MemoryBackend::File,
            MemorySpec::Uffd { prefetch } => MemoryBackend::Uffd { prefetch },
        },
        runtime_dir: Some(runtime_dir()),
        track_dirty: spec.track_dirty,
        disks,
        start_paused: true,
        flush: spec.flush,
        ..RestoreOptions::default()
    };
    Vm::restore(Path::new(&spec.snapshot), options).map_err(vmm_failure)
}
