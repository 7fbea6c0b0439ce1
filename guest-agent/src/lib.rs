//! Capsule's guest agent: the wire protocol shared by host and guest, and
//! the host-side client. The agent itself (PID 1 in every microVM) is the
//! `capsule-agent` binary in `src/bin/agent`.

pub mod client;
pub mod protocol;

pub use client::{
    AgentClient, AttachHandle, ClientError, ClientOptions, ExecEvent, ExecHandle, ExecInput,
    FileDownload, Listing, LogEvent, Output, PendingRestored, PortStream, PortWriter, WatchHandle,
};
pub use protocol::{ExecRequest, ExitStatus, Identity, TerminalSize};
