//! Errors of a sandbox: the machine's, the agent's, and the guest not
//! coming up.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not prefixed: the VMM's messages say what failed.
    #[error(transparent)]
    Vm(#[from] vmm::Error),
    /// Not prefixed: the client's own messages name the agent, and a
    /// protocol error names the frame or connection at fault.
    #[error(transparent)]
    Agent(#[from] guest_agent::ClientError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("the guest did not become ready within {seconds:.1}s. Last console lines:\n{console}")]
    NotReady { seconds: f64, console: String },
    #[error("the VM stopped before its agent was ready ({exit}). Last console lines:\n{console}")]
    StoppedBeforeReady { exit: String, console: String },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error(transparent)]
    Child(#[from] capsule_vmm::client::ClientError),
    #[error("the capsule-vmm child: {0}")]
    ChildAnswer(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Io(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The guest stopped answering (its agent did not reply, or never
    /// became ready) while the VM still runs: a stalled or overloaded
    /// guest rather than a refused request.
    pub fn is_guest_unresponsive(&self) -> bool {
        match self {
            Error::Agent(e) => e.is_no_answer(),
            Error::NotReady { .. } => true,
            Error::Io(e) => e.kind() == std::io::ErrorKind::TimedOut,
            _ => false,
        }
    }
}
