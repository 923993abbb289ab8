use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("failed to create a pipe for the service's output: {0}")]
    Pipe(nix::Error),
    #[error("failed to open /dev/null: {0}")]
    DevNull(std::io::Error),
    #[error("failed to create the service's namespaces (clone with CLONE_NEWPID|CLONE_NEWIPC): {0}; stasis needs root on a kernel with PID and IPC namespaces")]
    Clone(nix::Error),
    #[error("failed to start the service command {program}: {reason}")]
    ExecService { program: String, reason: String },
    #[error("failed to install the namespace init at {path}: {source}")]
    InstallInit { path: PathBuf, source: std::io::Error },
    #[error("failed to hand the service's environment to the namespace init: {0}")]
    Environment(std::io::Error),
    #[error("failed to pass {what} to the namespace init: it contains a NUL byte")]
    Nul { what: &'static str },
}
