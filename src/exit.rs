//! The exit statuses the CLI promises scripts (docs/CLI.md, "Exit
//! status"). A command run in a sandbox (`capsule run`, `capsule exec`)
//! exits with that command's status, so capsule's own failures there are
//! all [`FAILED`], a status commands rarely use; every other command says
//! what went wrong with a status of its own.

use crate::client::{ApiRefusal, DaemonUnreachable};

/// Bad arguments (clap's own status), or input the daemon refused (400).
pub const BAD_INPUT: u8 = 2;
/// No such sandbox, template, group, secret or file (404).
pub const NOT_FOUND: u8 = 3;
/// Not in a state that allows it: already ended, not suspended, busy,
/// already exists (409).
pub const CONFLICT: u8 = 4;
/// A group's quota or the host's limit is reached (429).
pub const LIMIT: u8 = 5;
/// The daemon is not running or does not answer.
pub const NO_DAEMON: u8 = 6;
/// A command in a sandbox ran past its `--timeout` and was killed (as
/// coreutils' `timeout`).
pub const TIMED_OUT: u8 = 124;
/// Capsule or the sandbox failed (not the command run in it).
pub const FAILED: u8 = 125;

/// The status for an error that ended a command; `runs_a_command` for
/// those whose status is otherwise the guest command's.
pub fn for_error(e: &anyhow::Error, runs_a_command: bool) -> u8 {
    if runs_a_command {
        return FAILED;
    }
    if e.downcast_ref::<DaemonUnreachable>().is_some() {
        return NO_DAEMON;
    }
    match e.downcast_ref::<ApiRefusal>().map(|r| r.status.as_u16()) {
        Some(400 | 422) => BAD_INPUT,
        Some(404) => NOT_FOUND,
        Some(409) => CONFLICT,
        Some(429) => LIMIT,
        _ => FAILED,
    }
}
