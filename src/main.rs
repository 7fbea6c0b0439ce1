//! `capsule`: isolated, on-demand KVM microVMs.

mod api;
mod args;
mod artifacts;
mod bearer;
mod client;
mod commands;
mod daemon;
mod doctor;
mod exec;
mod exit;
mod files;
mod json_num;
mod keeper;
mod labels;
mod manage;
mod mcp;
mod ports;
mod processes;
mod progress;
mod run;
mod secrets;
mod shell;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capsule",
    version,
    about = "Isolated, on-demand KVM microVMs for code execution"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM, run one command in it, stream its output, tear it down
    /// (or keep it running with --keep --name).
    ///
    /// Exits with the command's exit status (128 + N if killed by signal N),
    /// or 125 if the sandbox itself failed.
    Run(run::RunArgs),
    /// Run a command in a kept sandbox.
    Exec(commands::ExecArgs),
    /// Snapshot a kept sandbox (memory, vCPU and device state) into a
    /// directory; the sandbox keeps running.
    Snapshot(commands::SnapshotArgs),
    /// Restore a snapshot and run a command in it (or keep it running).
    Restore(commands::RestoreArgs),
    /// Start many replicas of a snapshot at once, each with its own
    /// identity, and run a command in each.
    Fork(commands::ForkArgs),
    /// Stop a kept sandbox.
    Stop(commands::StopArgs),
    /// List the kept sandboxes.
    Ls,
    /// Run the sandbox manager: the HTTP API on $CAPSULE_HOME/api.sock,
    /// state in SQLite, one supervised VMM process per sandbox.
    Serve(daemon::ServeArgs),
    /// Sandboxes managed by the daemon (`capsule serve`).
    #[command(subcommand)]
    Sandbox(manage::SandboxCommand),
    /// Groups and their quotas (daemon).
    #[command(subcommand)]
    Group(manage::GroupCommand),
    /// Templates: primed snapshots to create and fork sandboxes from (daemon).
    #[command(subcommand)]
    Template(manage::TemplateCommand),
    /// Prewarmed pools of a template's sandboxes (daemon).
    #[command(subcommand)]
    Pool(manage::PoolCommand),
    /// Secrets of a group, given to its sandboxes as environment (daemon).
    #[command(subcommand)]
    Secret(manage::SecretCommand),
    /// Whether this host can run sandboxes, and what to do if not (exit
    /// status 0 only if it can).
    Doctor(doctor::DoctorArgs),
    /// What happened to the daemon's sandboxes, in order.
    Events(manage::EventsArgs),
    /// End a daemon sandbox (the same as `capsule sandbox rm`).
    Rm { id: String },
    /// Suspend a daemon sandbox to disk (`capsule sandbox suspend`).
    Suspend { id: String },
    /// Resume a suspended daemon sandbox (`capsule sandbox resume`).
    Resume { id: String },
    /// An MCP server on stdio whose tools drive sandboxes through the
    /// daemon (`claude mcp add capsule -- capsule mcp`).
    Mcp(mcp::McpArgs),
    /// Expose a guest TCP port on the host's loopback and print its
    /// address (no PORT: list them; --rm PORT: stop).
    Port(ports::PortArgs),
    /// An interactive terminal in a daemon sandbox (a login shell, or the
    /// command after `--`); exits with the program's status.
    Shell(shell::ShellArgs),
    /// Copy a file into or out of a daemon sandbox (`ID:/path` names the
    /// sandbox side; -r for a directory tree).
    Cp(files::CpArgs),
    /// Files in a daemon sandbox: ls, stat, mkdir, rm, mv, watch.
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// The detached processes in a daemon sandbox (`capsule exec --detach`).
    Ps(processes::PsArgs),
    /// A detached process's output, from the start or an offset.
    Logs(processes::LogsArgs),
    /// Send a signal to a detached process (KILL by default).
    Kill(processes::KillArgs),
    /// Print a shell completion script, e.g.
    /// `capsule completion bash > /etc/bash_completion.d/capsule`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // VMM and device messages on stderr: warnings and errors always, more
    // with CAPSULE_LOG=info|debug|trace. The daemon has a log of its own.
    if !matches!(cli.command, Command::Serve(_)) {
        vmm::logging::log_to_stderr("capsule: ", "CAPSULE_LOG");
    }
    let _ = vmm::host::raise_fd_limit();
    let runs_a_command = matches!(
        cli.command,
        Command::Run(_) | Command::Exec(_) | Command::Fork(_)
    );
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Exec(args) => commands::exec(args),
        Command::Snapshot(args) => commands::snapshot(args),
        Command::Restore(args) => commands::restore(args),
        Command::Fork(args) => commands::fork(args),
        Command::Stop(args) => commands::stop(args),
        Command::Ls => commands::ls(),
        Command::Serve(args) => daemon::serve(args),
        Command::Sandbox(command) => manage::sandbox(command),
        Command::Group(command) => manage::group(command),
        Command::Secret(command) => manage::secret(command),
        Command::Template(command) => manage::template(command),
        Command::Pool(command) => manage::pool(command),
        Command::Events(args) => manage::events(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Rm { id } => manage::sandbox(manage::SandboxCommand::Rm { id, json: false }),
        Command::Suspend { id } => {
            manage::sandbox(manage::SandboxCommand::Suspend { id, json: false })
        }
        Command::Resume { id } => {
            manage::sandbox(manage::SandboxCommand::Resume { id, json: false })
        }
        Command::Mcp(args) => mcp::serve(args),
        Command::Shell(args) => shell::shell(args),
        Command::Port(args) => ports::port(args),
        Command::Cp(args) => files::cp(args),
        Command::Files(command) => files::files(command),
        Command::Ps(args) => processes::ps(args),
        Command::Logs(args) => processes::logs(args),
        Command::Kill(args) => processes::kill(args),
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "capsule", &mut std::io::stdout());
            Ok(0)
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("capsule: error: {e:#}");
            ExitCode::from(exit::for_error(&e, runs_a_command))
        }
    }
}
