//! How a background supervisor tells `stasis start` that the service is up (or why not): one
//! JSON line on an inherited pipe, then EOF. `Progress: ` lines may come before it.

use crate::supervisor::status::StartedFrom;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

pub const READY_FD_ENV: &str = "STASIS_READY_FD";

#[derive(Debug, Serialize, Deserialize)]
pub struct StartReport {
    pub ok: bool,
    pub pid: Option<i32>,
    pub started_from: Option<StartedFrom>,
    pub checkpoint: Option<String>,
    pub fallback_reason: Option<String>,
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    /// Things the user should know that did not stop the start (a changed service file...).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl StartReport {
    /// `exit_code` is the one `stasis start` exits with (the CLI's to choose).
    pub fn failure(error: String, exit_code: i32) -> StartReport {
        StartReport {
            ok: false,
            pid: None,
            started_from: None,
            checkpoint: None,
            fallback_reason: None,
            error: Some(error),
            exit_code: Some(exit_code),
            warnings: Vec::new(),
        }
    }
}

/// The readiness pipe given by `stasis start`, if any.
pub struct Notifier(Option<std::fs::File>);

impl Notifier {
    pub fn from_env() -> Notifier {
        let fd = std::env::var(READY_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok());
        std::env::remove_var(READY_FD_ENV);
        if let Some(fd) = fd.filter(|fd| *fd > 2) {
            // `start` reads until every writer is gone: no child (CRIU, a lazy restore's
            // lazy-pages daemon, which runs on after the report) may hold the pipe open.
            // SAFETY: fcntl on the descriptor `stasis start` handed to us.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // SAFETY: `stasis start` put this fd in place for us and nothing else owns it.
        Notifier(fd.filter(|fd| *fd > 2).map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// A `Progress: ` line for the waiting `start`, before the report.
    pub fn progress(&self, line: &str) {
        if let Some(f) = &self.0 {
            let _ = (&*f).write_all(format!("{line}\n").as_bytes());
        }
    }

    /// A second handle on the same pipe for `Progress: ` lines from another thread (a readiness
    /// wait); it sends nothing once this one has sent the report, which closes nothing of its
    /// own: the copy is dropped with the wait.
    pub fn for_progress(&self) -> Notifier {
        Notifier(self.0.as_ref().and_then(|f| f.try_clone().ok()))
    }

    pub fn send(&mut self, report: &StartReport) {
        if let Some(mut f) = self.0.take() {
            let mut line = serde_json::to_vec(report).expect("report serializes");
            line.push(b'\n');
            let _ = f.write_all(&line);
        }
    }
}
