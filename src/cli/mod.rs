//! The `stasis` command line: parses arguments and dispatches to one module per command.

mod add;
mod all;
mod args;
mod checkpoint;
mod checkpoints;
mod doctor;
pub mod error;
pub mod exit_codes;
mod export;
mod gc;
mod generate;
mod import;
mod inspect;
mod logs;
mod metrics;
mod output;
mod prune;
mod restart;
mod start;
mod status;
mod stop;
mod terminate;
mod unquarantine;
mod validate;
mod verb_error;

#[cfg(test)]
pub(crate) use stop::relay;

use crate::paths::Dirs;
pub use args::Cli;
use args::Command;
use clap::Parser;
use error::Error;

pub fn run(argv: Vec<std::ffi::OsString>) -> i32 {
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit_codes::USAGE } else { exit_codes::OK };
            let _ = e.print();
            return code;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!("cli: begin");
    // A command piped into `head` should end quietly, not panic on EPIPE. Not for the
    // supervisor: it writes to sockets whose clients may hang up, and must live on.
    let long_running = matches!(cli.command, Command::Supervise { .. } | Command::Start { foreground: true, .. });
    if !long_running {
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let d = cli.dirs;
    let dirs = Dirs::new(d.config_dir, d.state_dir, d.run_dir, d.criu_config_dir, d.host_config);
    let result = match cli.command {
        Command::Start { all: true, json, .. } => all::start_all(&dirs, json),
        Command::Start { name, from, force, foreground, json, .. } => verb_error::report(start::run(
            &dirs,
            name.as_deref().unwrap_or_default(),
            from.as_deref(),
            force,
            foreground,
            json,
        )),
        Command::Stop { all: true, json, .. } => all::stop_all(&dirs, json),
        Command::Stop { name, no_checkpoint: true, json, .. } => {
            verb_error::report(terminate::run(&dirs, name.as_deref().unwrap_or_default(), json))
        }
        Command::Stop { name, json, .. } => stop::run(&dirs, name.as_deref().unwrap_or_default(), json),
        Command::Restart { name, cold, json } => verb_error::report(restart::run(&dirs, &name, cold, json)),
        Command::Checkpoint { name, json } => checkpoint::run(&dirs, &name, json),
        Command::Status { name, json } => status::run(&dirs, name.as_deref(), json),
        Command::List { json } => status::run(&dirs, None, json),
        Command::Checkpoints { name, delete: Some(id), force, json, .. } => {
            verb_error::report(prune::run(&dirs, &name, prune::Doomed::One { id: &id }, force, json))
        }
        Command::Checkpoints { name, prune: Some(keep), force, json, .. } => {
            verb_error::report(prune::run(&dirs, &name, prune::Doomed::KeepNewest(keep), force, json))
        }
        Command::Checkpoints { name, json, .. } => checkpoints::run(&dirs, &name, json),
        Command::Doctor { name, json } => doctor::run(&dirs, &name, json),
        Command::Export { name, id, output, json } => export::run(&dirs, &name, id.as_deref(), &output, json),
        Command::Import { file, as_name, json } => import::run(&dirs, &file, as_name.as_deref(), json),
        Command::Inspect { name, id, json } => inspect::run(&dirs, &name, id.as_deref(), json),
        Command::Logs { name, lines, follow } => logs::run(&dirs, &name, lines, follow),
        Command::Validate { targets, json } => validate::run(&dirs, &targets, json),
        Command::Add(a) => add::add(&dirs, a),
        Command::Remove { name, purge } => add::remove(&dirs, &name, purge),
        Command::Gc { yes, json } => gc::run(&dirs, yes, json),
        Command::Metrics => metrics::run(&dirs),
        Command::InitScript { name } => generate::init_script(&dirs, &name),
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { dir } => generate::man_pages(&dir),
        Command::Supervise { name, from, cold } => start::supervise(&dirs, &name, from, cold),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stasis: error: {}", crate::text::escape_lines(&e.to_string()));
            exit_codes::of(&e)
        }
    }
}

fn require_root() -> Result<(), Error> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}
