//! The `majordome` command: parses arguments and hands over to a command.
//! Errors a user can cause end here as one line on stderr and exit code 1.

mod backup_cmd;
mod cli;
mod commands;
mod scenario_cmd;
mod state_cmd;
mod titanic_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let default_level = if cli.command.is_server() { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAJORDOME_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
