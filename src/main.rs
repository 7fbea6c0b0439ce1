//! `capsule`: isolated, on-demand KVM microVMs.

mod artifacts;
mod run;

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
    /// Boot a microVM, run one command in it, stream its output, tear it down.
    ///
    /// Exits with the command's exit status (128 + N if killed by signal N),
    /// or 125 if the sandbox itself failed.
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("capsule: error: {e:#}");
            ExitCode::from(run::SANDBOX_FAILURE)
        }
    }
}
