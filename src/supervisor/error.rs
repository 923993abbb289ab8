//! Why a supervisor could not start or keep its service: its own failures to set up
//! (`SupervisorError`) and everything a start can come to (`StartError`). The CLI turns them
//! into exit codes.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("failed to listen on kill port 127.0.0.1:{port} (key `kill_port` in {file}): {source}; {}", held_by(holder, *port))]
    KillPortInUse { port: u16, file: PathBuf, source: std::io::Error, holder: Option<super::holder::Holder> },
    #[error("failed to listen on control socket {path}: {source}")]
    ControlSocket { path: PathBuf, source: std::io::Error },
    #[error("failed to take the lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("failed to become a child subreaper: {0}")]
    Subreaper(nix::Error),
    #[error("failed to start the event loop: {0}")]
    Runtime(std::io::Error),
}

fn held_by(holder: &Option<super::holder::Holder>, port: u16) -> String {
    match holder {
        Some(h) => format!("{h} holds it; stop that or pick another port"),
        None => format!("another process uses it (find it with `ss -ltnp 'sport = :{port}'`) or pick another port"),
    }
}

/// Why the supervisor did not get its service running (or keep it up through its first start).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Criu(#[from] crate::criu::CriuError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Launch(#[from] crate::process::LaunchError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// The engine got no service running.
    #[error(transparent)]
    Engine(#[from] crate::engine::restore::StartError),
    #[error("{service} is already running (supervisor pid {pid}); stop it first with `stasis stop {service}`")]
    AlreadyRunning { service: String, pid: String },
    #[error("an earlier run of {service} is still running without a supervisor (its supervisor died; namespace init pid {pid}); starting another copy could corrupt its state: stop it with `kill -TERM {pid}` (then -KILL if it stays), then start {service} again")]
    Orphaned { service: String, pid: i32 },
    #[error("failed to {action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    /// It died at once, or never became ready.
    #[error("{0}")]
    StartFailed(String),
}

impl StartError {
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StartError::Io { action, path: path.into(), source }
    }
}

/// How a supervisor that got its service running ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Stopped on request (with or without a checkpoint).
    Stopped,
    /// The service failed and was not (or no longer) restarted.
    Failed,
}
