//! Why a checkpoint was not taken ([`DumpError`], one variant per step), and why a stop was
//! called off at `post-dump` ([`Withdrawn`]).

use super::post_dump::Refusal;
use crate::criu::CriuError;
use crate::engine::Job;
use crate::store::safe_open::UnsafeFile;
use crate::store::{PendingCheckpoint, StoreError};
use crate::time_fmt::human_bytes;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Less free space than this after a failed dump means the dump ran out of it.
const NEARLY_FULL: u64 = 1 << 20;

/// Why a checkpoint was not taken, one variant per step that can fail. Its text is a summary
/// line (saying that the service keeps running and earlier checkpoints are untouched), then
/// CRIU's error lines, if any: `protocol::final_line` sends it that way.
#[derive(Debug)]
pub enum DumpError {
    /// The host's dump slots could not be used.
    Slot { dir: PathBuf, source: std::io::Error },
    /// The encryption key could not be read.
    Key(crate::store::seal::KeyError),
    /// The pending checkpoint could not be begun, written or finalized.
    Store(StoreError),
    /// An executable the service maps could not be read safely to record its identity.
    Identities(UnsafeFile),
    /// CRIU failed, or was refused at `post-dump`.
    Criu(Box<FailedDump>),
    /// CRIU said it dumped a stopping service, but `post-dump` never made the checkpoint durable.
    NotFinalized,
    /// CRIU failed after `post-dump` made the checkpoint durable and the service was resumed:
    /// the checkpoint is kept, marked stale (`marking` is why it could not be).
    AfterWrite { criu: CriuError, id: String, marking: Option<StoreError> },
    /// Whoever asked for the stop withdrew before it was carried out.
    Withdrawn(Withdrawn),
    /// A lazy restore was still bringing pages in, or failed doing so.
    LazyTransfer(Box<crate::engine::restore::lazy_start::Unsettled>),
}

/// Why a periodic checkpoint is skipped before it begins: the disk has no room for it.
#[derive(Debug, thiserror::Error)]
pub enum NoRoom {
    #[error("failed to read the free space of {}: {source}", dir.display())]
    FreeSpace { dir: PathBuf, source: nix::Error },
    /// `estimate` is what the checkpoint is likely to take, `min_free` the service's setting.
    #[error("{} has {} free, and the checkpoint needs about {} plus min_free_bytes ({}); free space, lower min_free_bytes, or move --state-dir", dir.display(), human_bytes(*free), human_bytes(*estimate), human_bytes(*min_free))]
    Full { dir: PathBuf, free: u64, estimate: u64, min_free: u64 },
}

/// Why a stopping dump was refused at `post-dump`: everyone who asked for it asked by silence
/// alone, and each has since sent something else or left. The first of them is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawn {
    /// The kill-port client.
    pub from: SocketAddr,
    pub by: WithdrawnBy,
}

/// What the silent client did instead of waiting for its stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithdrawnBy {
    TlsHandshake,
    HttpRequest,
    Leaving,
    /// Any other bytes than `stop`.
    OtherBytes,
}

impl std::fmt::Display for Withdrawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let did = match self.by {
            WithdrawnBy::TlsHandshake => "began a TLS handshake",
            WithdrawnBy::HttpRequest => "sent an HTTP request",
            WithdrawnBy::Leaving => "closed the connection",
            WithdrawnBy::OtherBytes => "sent something other than \"stop\"",
        };
        write!(f, "the stop was called off: the kill-port client that asked for it by staying silent ({}) {did} before it was carried out", self.from)
    }
}

/// A dump CRIU failed, with what its log says in the service's terms.
#[derive(Debug)]
pub struct FailedDump {
    /// Its log is the kept `last-failed-dump.log`.
    error: CriuError,
    /// A cause CRIU's log shows often, with the fix.
    diagnosis: Option<String>,
    /// Why `post-dump` refused it, if it did.
    refusal: Option<Refusal>,
    /// The directory whose full disk failed it.
    full_disk: Option<PathBuf>,
}

impl DumpError {
    /// Whether the same dump may well work a moment later (a refusal for a passing reason).
    pub(super) fn may_pass(&self) -> bool {
        matches!(self, DumpError::Criu(f) if f.refusal.as_ref().is_some_and(Refusal::passing))
    }

    pub fn summary(&self) -> String {
        match self {
            DumpError::Slot { dir, source } => format!("failed to take a dump slot in {}: {source}", dir.display()),
            DumpError::Key(e) => e.to_string(),
            DumpError::Store(e) => e.to_string(),
            DumpError::Identities(e) => e.to_string(),
            DumpError::Criu(f) => f.summary(),
            DumpError::NotFinalized => {
                "CRIU reported success but the checkpoint was not finalized at its post-dump notification".into()
            }
            DumpError::AfterWrite { criu, id, marking } => {
                let note = match marking {
                    None => format!("checkpoint {id} was saved but is stale"),
                    Some(m) => format!("checkpoint {id} was saved, and marking it stale failed ({m})"),
                };
                format!("{} after the checkpoint was written; the service was resumed; {note}", criu.one_line())
            }
            DumpError::Withdrawn(w) => w.to_string(),
            DumpError::LazyTransfer(e) => e.to_string(),
        }
    }
}

impl DumpError {
    /// The first line: what failed, and that nothing was lost.
    pub fn headline(&self) -> String {
        format!("{}; the service keeps running and earlier checkpoints are untouched", self.summary())
    }

    /// CRIU's error lines, if CRIU failed.
    pub fn criu_lines(&self) -> &[String] {
        match self {
            DumpError::Criu(failed) => match &failed.error {
                CriuError::Failed { errors, .. } => errors,
                _ => &[],
            },
            _ => &[],
        }
    }

    /// A dump CRIU failed with `errors` (its log at `log`), for tests of what the reply says.
    #[cfg(test)]
    pub fn criu_failed(log: &str, errors: &[&str]) -> DumpError {
        DumpError::Criu(Box::new(FailedDump {
            error: CriuError::Failed {
                action: "dump",
                status: "exit status 1".into(),
                log: log.into(),
                errors: errors.iter().map(|l| l.to_string()).collect(),
            },
            diagnosis: None,
            refusal: None,
            full_disk: None,
        }))
    }
}

/// The headline, then CRIU's lines, one a line.
impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.headline())?;
        for line in self.criu_lines() {
            write!(f, "\n{line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DumpError {}

impl From<StoreError> for DumpError {
    fn from(e: StoreError) -> Self {
        DumpError::Store(e)
    }
}

impl FailedDump {
    /// Keeps CRIU's log as the last failed dump's (the pending directory is about to go) and
    /// reads what it says.
    pub(super) fn new(ctx: &Job, pending: &PendingCheckpoint, e: CriuError, refusal: Option<Refusal>) -> FailedDump {
        let error = keep_log(ctx, e);
        let CriuError::Failed { errors, .. } = &error else {
            return FailedDump { error, diagnosis: None, refusal, full_disk: None };
        };
        let diagnosis = crate::criu::diagnose::diagnose(errors, &ctx.service.name);
        let dir = pending.dir.parent().unwrap_or(&pending.dir);
        let says_full =
            errors.iter().any(|l| l.contains("No space left") || l.contains("(-28)") || l.contains("Disk quota"));
        // A full disk may not even leave room for CRIU's log, so ask the filesystem as well.
        let is_full = nix::sys::statvfs::statvfs(dir)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()) < NEARLY_FULL)
            .unwrap_or(false);
        let full_disk = (says_full || is_full).then(|| dir.to_path_buf());
        FailedDump { error, diagnosis, refusal, full_disk }
    }

    fn summary(&self) -> String {
        let mut text = self.error.one_line();
        // A cause CRIU's log shows often, said in the service's terms with the fix, first.
        if let Some(why) = &self.diagnosis {
            text = format!("{why} ({text})");
        }
        if let Some(r @ Refusal::ProcFileOpen { .. }) = &self.refusal {
            text = format!("{r}; {text}");
        }
        if let Some(dir) = &self.full_disk {
            text.push_str(&format!(
                "; the disk holding {} is full (No space left on device): free space or move --state-dir to a larger filesystem",
                dir.display()
            ));
        }
        text
    }
}

/// Moves CRIU's log to `last-failed-dump.log` and returns the error naming it there.
fn keep_log(ctx: &Job, e: CriuError) -> CriuError {
    let kept = ctx.paths.failed_dump_log();
    let keep = |log: &Path| {
        // The checkpoints may be another filesystem (a full one, even): copy when rename can't.
        let moved = std::fs::rename(log, &kept).is_ok() || std::fs::copy(log, &kept).is_ok();
        if moved {
            kept.clone()
        } else {
            log.to_path_buf()
        }
    };
    match e {
        CriuError::Failed { action, status, log, errors } => {
            let kept_log = keep(&log);
            // A full disk can leave the log file short: keep at least the lines quoted here.
            if std::fs::metadata(&kept_log).map(|m| m.len() == 0).unwrap_or(true) && !errors.is_empty() {
                let _ = std::fs::write(&kept_log, format!("{}\n", errors.join("\n")));
            }
            CriuError::Failed { action, status, log: kept_log, errors }
        }
        // CRIU got what was left of dump_timeout; the setting is what the user knows.
        CriuError::TimedOut { action, setting, log, .. } => {
            CriuError::TimedOut { action, setting, after: ctx.service.dump_timeout, log: keep(&log) }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_dump_says_what_it_leaves_on_its_first_line_and_crius_lines_after() {
        let e = DumpError::Criu(Box::new(FailedDump {
            error: CriuError::Failed {
                action: "dump",
                status: "exit status 1".into(),
                log: "/s/last-failed-dump.log".into(),
                errors: vec!["(0.1) Error (x.c:1): why".into(), "(0.2) Error (y.c:2): unwinding".into()],
            },
            diagnosis: None,
            refusal: None,
            full_disk: Some("/s".into()),
        }));
        assert_eq!(
            e.to_string(),
            "failed to dump with CRIU (exit status 1): why (log: /s/last-failed-dump.log); the disk holding /s is full (No space left on device): free space or move --state-dir to a larger filesystem; the service keeps running and earlier checkpoints are untouched\n(0.1) Error (x.c:1): why\n(0.2) Error (y.c:2): unwinding"
        );
        let e = DumpError::AfterWrite {
            criu: CriuError::Failed { action: "dump", status: "killed".into(), log: "/l".into(), errors: vec![] },
            id: "20261125T015053.123Z".into(),
            marking: None,
        };
        assert_eq!(
            e.to_string(),
            "failed to dump with CRIU (killed): its log has no error lines (was it written?) (log: /l) after the checkpoint was written; the service was resumed; checkpoint 20261125T015053.123Z was saved but is stale; the service keeps running and earlier checkpoints are untouched"
        );
    }
}
