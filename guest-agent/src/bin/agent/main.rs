//! `capsule-agent`: PID 1 inside every Capsule microVM.
//!
//! It sets the machine up, listens for the host on vsock, tells the host it
//! is ready, runs what it is asked to, reaps every process, and powers the
//! machine off when told to (or when sent the usual init signals).

mod conn;
mod detached;
mod exec;
mod files;
mod identity;
mod init;
mod ports;
mod reaper;
mod stream;
mod sys;
mod terminal;
mod tree;
mod vsock;
mod watch;

use std::time::{Duration, Instant};

use guest_agent::protocol::{Frame, FrameKind, AGENT_PORT, READY_PORT};

fn main() {
    let pid1 = std::process::id() == 1;
    // Block the init signals before any thread exists so every thread
    // inherits the mask and only the signal thread receives them.
    // busybox's reboot/halt/poweroff send SIGTERM/SIGUSR1/SIGUSR2 to PID 1.
    let signals = if pid1 {
        sys::SignalWaiter::block(&[libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2, libc::SIGINT]).ok()
    } else {
        None
    };
    if pid1 {
        init::setup();
    }
    // Start reaping before anything can spawn.
    reaper::Reaper::global();

    if let Some(signals) = signals {
        std::thread::spawn(move || {
            let why = match signals.wait() {
                libc::SIGTERM | libc::SIGINT => "reboot requested",
                _ => "poweroff requested",
            };
            init::shutdown(why);
        });
    }

    let listener = match vsock::Listener::bind(AGENT_PORT) {
        Ok(l) => l,
        Err(e) => fatal(
            pid1,
            &format!("cannot listen on vsock port {AGENT_PORT}: {e}"),
        ),
    };
    std::thread::spawn(announce_ready);
    loop {
        match listener.accept() {
            Ok(conn) => {
                std::thread::spawn(move || conn::serve(conn));
            }
            Err(e) => {
                eprintln!("capsule-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Connects to the host's ready port and sends a hello: the host's signal
/// that the guest takes commands now. Retried briefly in case the vsock
/// device is still settling.
fn announce_ready() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match vsock::connect_host(READY_PORT) {
            Ok(mut conn) => {
                let _ = Frame::json(FrameKind::Hello, 0, &conn::hello()).write_to(&mut conn);
                vsock::shutdown(&conn);
                return;
            }
            Err(e) if Instant::now() > deadline => {
                eprintln!("capsule-agent: cannot reach the host on vsock port {READY_PORT}: {e}");
                return;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn fatal(pid1: bool, message: &str) -> ! {
    eprintln!("capsule-agent: {message}");
    if pid1 {
        init::shutdown("fatal error");
    }
    std::process::exit(1)
}

#[cfg(test)]
mod files_tests;
#[cfg(test)]
mod terminal_tests;
#[cfg(test)]
mod tests;
