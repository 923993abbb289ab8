//! What `criu dump` is asked (over RPC: criu::dump) and the command line of `criu restore`. Options that stasis depends on are set
//! here; everything tunable lives in the service's `criu-configs/*.conf` and `criu.options`,
//! both held to the allowlist of `config::criu_options` when the service is loaded. CRIU reads
//! the config file before the command line, and the options after stasis's own, so a later
//! spelling of a stasis option would win: that is what the allowlist rules out.

use std::ffi::OsString;
use std::path::PathBuf;

/// Verbose logs cost little next to a dump and are what makes a failure diagnosable.
const LOG_LEVEL: &str = "-v4";
const NO_DEFAULT_CONFIG: &str = "--no-default-config";

#[derive(Debug, Clone)]
pub struct DumpArgs {
    /// Host PID of the service's namespace init: the root of the dumped tree.
    pub pid: i32,
    pub images_dir: PathBuf,
    /// Holds `dump.log`.
    pub work_dir: PathBuf,
    pub config_file: PathBuf,
    pub options: Vec<String>,
    pub leave_running: bool,
}

pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";
pub const RESTORE_PIDFILE: &str = "restore.pid";

#[derive(Debug, Clone)]
pub struct RestoreArgs {
    pub images_dir: PathBuf,
    /// Holds `restore.log` and the pidfile.
    pub work_dir: PathBuf,
    pub config_file: PathBuf,
    pub options: Vec<String>,
    /// The inode of the pipe the dumped service wrote its stdout/stderr to.
    pub stdout_pipe_inode: Option<u64>,
}

impl RestoreArgs {
    /// `inherited_fd`: the number the service's new stdout pipe has in criu's process.
    pub fn argv(&self, inherited_fd: Option<i32>) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "restore".into(),
            "--images-dir".into(),
            self.images_dir.clone().into(),
            "--work-dir".into(),
            self.work_dir.clone().into(),
            "--log-file".into(),
            "-".into(),
            LOG_LEVEL.into(),
            NO_DEFAULT_CONFIG.into(),
            "--config".into(),
            self.config_file.clone().into(),
            // Detached, so the restored root is re-parented to the supervisor (a child subreaper).
            "--restore-detached".into(),
            "--pidfile".into(),
            RESTORE_PIDFILE.into(),
        ];
        if let (Some(inode), Some(fd)) = (self.stdout_pipe_inode, inherited_fd) {
            a.push("--inherit-fd".into());
            a.push(format!("fd[{fd}]:pipe:[{inode}]").into());
        }
        a.extend(self.options.iter().map(OsString::from));
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|s| s.into_string().unwrap()).collect()
    }

    #[test]
    fn restore_argv_reattaches_the_stdout_pipe() {
        let a = RestoreArgs {
            images_dir: "/c/images".into(),
            work_dir: "/c".into(),
            config_file: "/d.conf".into(),
            options: vec![],
            stdout_pipe_inode: Some(12345),
        };
        let v = strings(a.argv(Some(7)));
        assert!(v.contains(&"--restore-detached".to_string()));
        assert!(v.contains(&"--no-default-config".to_string()));
        assert!(v.contains(&"fd[7]:pipe:[12345]".to_string()));
        assert!(!strings(a.argv(None)).iter().any(|s| s.contains("pipe:[")), "no pipe, no --inherit-fd");
    }
}
