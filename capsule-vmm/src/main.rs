//! The `capsule-vmm` child: serves its control connections until its VM
//! has ended (see the crate's documentation).

mod server;

use std::os::fd::{AsFd, OwnedFd};

use capsule_vmm::channel::Channel;

fn main() -> std::process::ExitCode {
    vmm::logging::log_to_stderr("capsule-vmm: ", "CAPSULE_LOG");
    if std::env::args().nth(1).is_some_and(|a| a == "--version") {
        println!("capsule-vmm {}", env!("CARGO_PKG_VERSION"));
        return std::process::ExitCode::SUCCESS;
    }
    let stdin = std::io::stdin().as_fd().try_clone_to_owned();
    let control = match stdin.map_err(|e| e.to_string()).and_then(check_control) {
        Ok(fd) => Channel::from_fd(fd),
        Err(why) => {
            eprintln!(
                "capsule-vmm: {why}: it is started by capsule, with a SOCK_SEQPACKET control socket \
                 as its standard input"
            );
            return std::process::ExitCode::from(2);
        }
    };
    match server::Server::new(control).and_then(|s| s.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capsule-vmm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Standard input must be a connected SOCK_SEQPACKET socket.
fn check_control(fd: OwnedFd) -> Result<OwnedFd, String> {
    use nix::sys::socket::{getsockopt, sockopt::SockType as Type, SockType};
    match getsockopt(&fd, Type) {
        Ok(SockType::SeqPacket) => Ok(fd),
        Ok(other) => Err(format!("standard input is a {other:?} socket")),
        Err(_) => Err("standard input is not a socket".into()),
    }
}
