//! The exit codes of every `stasis` command, one per kind of failure, and which error ends with
//! which: no layer below the CLI knows them. Documented in `docs/exit-codes.md`; scripts rely
//! on them, so never renumber.

/// The command did what was asked (including `stop` of a service that is already stopped).
pub const OK: i32 = 0;
/// An unexpected internal failure (a bug, or an I/O error nobody anticipated).
pub const INTERNAL: i32 = 1;
/// The command line was malformed (clap's own code).
pub const USAGE: i32 = 2;
/// A service file is missing or invalid: YAML syntax, unknown key, bad value, missing user.
pub const CONFIG: i32 = 3;
/// `start` of a service that is already running.
pub const ALREADY_RUNNING: i32 = 4;
/// A checkpoint could not be taken; the service keeps running and earlier checkpoints are intact.
pub const CHECKPOINT_FAILED: i32 = 5;
/// The service could not be started (neither restored nor cold-launched), or it died at once.
pub const START_FAILED: i32 = 6;
/// The host is not ready: not root, CRIU missing or too old, kill port in use, unwritable directories.
pub const ENVIRONMENT: i32 = 7;
/// The command needs a running service and the service is not running.
pub const NOT_RUNNING: i32 = 8;
/// The checkpoint store is damaged or out of space in a way the command could not work around.
pub const STORE: i32 = 9;
/// `start` would not restore the checkpoint it had to (`--from ID`, or `on_incompatible: fail`)
/// and did not cold-start either; the checkpoint is kept.
pub const RESTORE_REFUSED: i32 = 10;
/// `import` refused the archive (not a stasis export, damaged, or it does not fit this host:
/// other binaries, an older CRIU); nothing was added.
pub const IMPORT_REFUSED: i32 = 11;
/// `stop` interrupted (Ctrl-C) after it asked for the stop: the supervisor carries on with the
/// checkpoint and stops the service; the message says how to follow it. 128 + SIGINT, as a shell.
pub const INTERRUPTED: i32 = 130;

use super::error::Error;
use crate::criu::CriuError;
use crate::supervisor::{StartError, SupervisorError};

/// The exit code a command that failed with `e` ends with.
pub fn of(e: &Error) -> i32 {
    match e {
        Error::Config(_) | Error::Refused(_) => CONFIG,
        Error::Criu(e) => of_criu(e),
        Error::Store(_) | Error::ExportFailed(_) => STORE,
        Error::Launch(_) => START_FAILED,
        Error::Start(e) => of_start(e),
        Error::NotRunning { .. } => NOT_RUNNING,
        Error::NotRoot | Error::NotAllowed(_) => ENVIRONMENT,
        Error::Io { .. } => INTERNAL,
        Error::CheckpointFailed(_) => CHECKPOINT_FAILED,
        Error::ImportRefused(_) => IMPORT_REFUSED,
    }
}

/// A CRIU that ran and failed is the checkpoint's failure; one that could not be run is the host's.
fn of_criu(e: &CriuError) -> i32 {
    match e {
        CriuError::Failed { .. } | CriuError::TimedOut { .. } => CHECKPOINT_FAILED,
        _ => ENVIRONMENT,
    }
}

/// The exit code of a supervisor (and of the `start` that waited for it) whose start failed.
pub fn of_start(e: &StartError) -> i32 {
    match e {
        StartError::Config(_) => CONFIG,
        StartError::Criu(e) => of_criu(e),
        StartError::Store(_) => STORE,
        StartError::Launch(_) | StartError::StartFailed(_) => START_FAILED,
        StartError::Supervisor(e) => of_supervisor(e),
        StartError::AlreadyRunning { .. } | StartError::Orphaned { .. } => ALREADY_RUNNING,
        StartError::Io { .. } => INTERNAL,
        StartError::Engine(e) if e.refused_restore() => RESTORE_REFUSED,
        // The supervisor reports any failure of the engine's start as a failed start.
        StartError::Engine(_) => START_FAILED,
    }
}

fn of_supervisor(e: &SupervisorError) -> i32 {
    match e {
        SupervisorError::KillPortInUse { .. }
        | SupervisorError::ControlSocket { .. }
        | SupervisorError::Lock { .. } => ENVIRONMENT,
        SupervisorError::Subreaper(_) | SupervisorError::Runtime(_) => INTERNAL,
    }
}

/// The exit status of a supervisor that got its service running.
pub fn of_ended(ended: crate::supervisor::Ended) -> i32 {
    match ended {
        crate::supervisor::Ended::Stopped => OK,
        crate::supervisor::Ended::Failed => START_FAILED,
    }
}
