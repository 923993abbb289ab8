//! Where stasis keeps things: the config, state and run directories and the per-service
//! paths under them. Every other module asks here instead of joining paths itself.

use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_DIR: &str = "/etc/stasis/services";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stasis";
pub const DEFAULT_RUN_DIR: &str = "/run/stasis";
/// Searched in order when no CRIU config dir is given; the last one is a source checkout.
const CRIU_CONFIG_DIRS: [&str; 2] = ["/etc/stasis/criu-configs", "/usr/share/stasis/criu-configs"];

#[derive(Debug, Clone)]
pub struct Dirs {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub criu_config_dir: PathBuf,
    /// The host's own settings (`stasis.yaml`).
    pub host_config: PathBuf,
}

impl Dirs {
    pub fn new(
        config_dir: PathBuf,
        state_dir: PathBuf,
        run_dir: PathBuf,
        criu_config_dir: Option<PathBuf>,
        host_config: PathBuf,
    ) -> Self {
        let criu_config_dir = criu_config_dir.unwrap_or_else(default_criu_config_dir);
        Dirs { config_dir, state_dir, run_dir, criu_config_dir, host_config }
    }

    /// Lock files of the host-wide dump and restore slots.
    pub fn slots(&self) -> PathBuf {
        self.run_dir.join("slots")
    }

    pub fn service_file(&self, name: &str) -> PathBuf {
        self.config_dir.join(format!("{name}.yaml"))
    }

    pub fn service(&self, name: &str) -> ServicePaths {
        ServicePaths {
            root: self.state_dir.join("services").join(name),
            lock: self.run_dir.join(format!("{name}.lock")),
            control_socket: self.run_dir.join(format!("{name}.sock")),
        }
    }

    /// Content-addressed copies of the namespace init (see `process::init_binary`).
    pub fn init_binaries(&self) -> PathBuf {
        self.state_dir.join("bin")
    }

    /// Content hashes of executables, keyed by their (dev, inode, size, mtime, ctime).
    /// The version of the criu binary in use, remembered per file.
    pub fn criu_version_cache(&self) -> PathBuf {
        self.state_dir.join("cache").join("criu-version.json")
    }

    pub fn hash_cache(&self) -> PathBuf {
        self.state_dir.join("cache").join("file-hashes.json")
    }

    /// The names of every service with a state directory (running or not, file or not).
    pub fn services_with_state(&self) -> Vec<String> {
        std::fs::read_dir(self.state_dir.join("services"))
            .map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

fn default_criu_config_dir() -> PathBuf {
    for dir in CRIU_CONFIG_DIRS {
        if Path::new(dir).is_dir() {
            return PathBuf::from(dir);
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        // An installed binary (PREFIX/bin/stasis) uses PREFIX/share/stasis/criu-configs; one run
        // from a source checkout (target/{debug,release}/stasis) uses the checkout's.
        let prefix = exe.parent().and_then(Path::parent);
        let candidates = [
            prefix.map(|p| p.join("share/stasis/criu-configs")),
            prefix.and_then(Path::parent).map(|p| p.join("criu-configs")),
        ];
        if let Some(dir) = candidates.into_iter().flatten().find(|d| d.is_dir()) {
            return dir;
        }
    }
    PathBuf::from(CRIU_CONFIG_DIRS[0])
}

/// The files of one service. Everything under `root` is root-only.
#[derive(Debug, Clone)]
pub struct ServicePaths {
    pub root: PathBuf,
    pub lock: PathBuf,
    pub control_socket: PathBuf,
}

impl ServicePaths {
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn quarantine(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    pub fn status_file(&self) -> PathBuf {
        self.root.join("status.json")
    }
    pub fn service_log(&self) -> PathBuf {
        self.root.join("service.log")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.root.join("supervisor.log")
    }
    /// Where the log of the last failed dump is kept (the failed checkpoint itself is discarded).
    pub fn failed_dump_log(&self) -> PathBuf {
        self.root.join("last-failed-dump.log")
    }
}
