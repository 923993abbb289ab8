use crate::exit_codes;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("failed to listen on kill port 127.0.0.1:{port} (key `kill_port` in {file}): {source}; {}", held_by(holder, *port))]
    KillPortInUse { port: u16, file: std::path::PathBuf, source: std::io::Error, holder: Option<super::holder::Holder> },
    #[error("failed to listen on control socket {path}: {source}")]
    ControlSocket { path: std::path::PathBuf, source: std::io::Error },
    #[error("failed to take the lock {path}: {source}")]
    Lock { path: std::path::PathBuf, source: std::io::Error },
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

impl SupervisorError {
    pub fn exit_code(&self) -> i32 {
        match self {
            SupervisorError::KillPortInUse { .. }
            | SupervisorError::ControlSocket { .. }
            | SupervisorError::Lock { .. } => exit_codes::ENVIRONMENT,
            _ => exit_codes::INTERNAL,
        }
    }
}
