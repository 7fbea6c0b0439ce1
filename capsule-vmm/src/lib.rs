//! `capsule-vmm`: the child process that runs exactly one VM, and the
//! control protocol its supervisor speaks to it.
//!
//! The supervisor starts the child with its runtime directory as working
//! directory and one end of a SOCK_SEQPACKET socket pair as its standard
//! input, then sends it a [`protocol::Op::Boot`] or
//! [`protocol::Op::Restore`] with the files the VM needs as descriptors:
//! the child needs nothing but those, its working directory and
//! `/dev/kvm`. It also listens on [`protocol::CONTROL_SOCKET`] there, so a
//! supervisor that comes later (a kept sandbox's CLI, a daemon that
//! restarted) can reach it; every connection gets the same events. The
//! child exits once its VM has ended and every connection has heard why.
//!
//! [`client::ChildClient`] is the supervisor's side.

pub mod channel;
pub mod client;
pub mod protocol;
