//! Progress of a long dump or restore for whoever waits on it: a line a second with the phase,
//! the bytes so far and the rate. CRIU has no progress channel, so the bytes are read from what
//! it leaves: the size of the images being written, the bytes its processes have read. Only
//! while CRIU runs; an idle supervisor never ticks.

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Lines about a dump or a restore under way start with this.
pub const PROGRESS_PREFIX: &str = "Progress: ";
/// How a readiness wait's progress line begins ([`waiting`]).
pub const WAITING_PREFIX: &str = "Progress: waiting for ";

/// Until the first report, and between reports.
pub const EVERY: Duration = Duration::from_secs(1);
/// A checkpoint at least this big takes long enough to restore that its phases are announced
/// as they begin, before the first byte count.
pub const BIG: u64 = 64 << 20;

/// `Progress: PHASE, DONE[ of TOTAL] VERB (RATE MiB/s, SECS s)`.
pub fn line(phase: &str, verb: &str, done: u64, total: Option<u64>, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64();
    let of = total.map(|t| format!(" of {}", crate::time_fmt::human_bytes(t))).unwrap_or_default();
    format!(
        "{}{phase}, {}{of} {verb} ({:.0} MiB/s, {:.1} s)",
        PROGRESS_PREFIX,
        crate::time_fmt::human_bytes(done),
        done as f64 / (1 << 20) as f64 / secs.max(0.001),
        secs
    )
}

/// A phase beginning: `Progress: PHASE SIZE`.
pub fn phase(phase: &str, bytes: u64) -> String {
    format!("{}{phase} {}", PROGRESS_PREFIX, crate::time_fmt::human_bytes(bytes))
}

/// A readiness wait under way: `Progress: waiting for WHAT (3 s of 30 s)`. `start` shows it on
/// a terminal (or with STASIS_PROGRESS=1), so no wait is silent for more than a second.
pub fn waiting(what: &str, waited: Duration, limit: Duration) -> String {
    format!("{}{what} ({} s of {})", WAITING_PREFIX, waited.as_secs(), crate::time_fmt::human_duration(limit))
}

/// How often, during a dump, the disk is told to start writing what CRIU has written so far.
const WRITEBACK_EVERY: Duration = Duration::from_millis(250);

/// Every second of a dump: freezing (nothing written yet), dumping (the images grow), syncing
/// (CRIU's log says the post-dump hook, which makes the checkpoint durable, is running). And
/// every quarter second, the writeback of the images so far is started (`sync_file_range`,
/// which waits for nothing and changes nothing): the disk writes while CRIU still dumps, so
/// the fsyncs at the end, which a stopping dump makes while the service is frozen, have little
/// left to wait for. Ends when `done`'s sender is dropped, at once. A pre-copy stop's pre-dump
/// (`pre_copy`) is pre-copying once its pages flow: the service runs again by then.
pub fn watch_dump(
    images: PathBuf,
    log: PathBuf,
    pre_copy: bool,
    report: &(impl Fn(String) + Sync),
    done: mpsc::Receiver<()>,
) {
    let started = Instant::now();
    let mut next_report = started + EVERY;
    while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(WRITEBACK_EVERY) {
        let files: Vec<(std::fs::File, u64)> = std::fs::read_dir(&images)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| {
                        let f = std::fs::File::open(e.path()).ok()?;
                        let len = f.metadata().ok()?.len();
                        Some((f, len))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (f, _) in &files {
            // SAFETY: a valid fd; the call only starts writeback of its dirty pages.
            unsafe { libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
        if Instant::now() < next_report {
            continue;
        }
        next_report += EVERY;
        let bytes: u64 = files.iter().map(|(_, len)| len).sum();
        let syncing =
            crate::criu::log_capture::read_tail(&log, 4096).is_ok_and(|t| t.contains("Running post-dump scripts"));
        let phase = match (syncing, bytes) {
            (_, 0) if !syncing => "freezing",
            _ if pre_copy => "pre-copying",
            (true, _) => "syncing",
            _ => "dumping",
        };
        report(line(phase, "written", bytes, None, started));
    }
}

/// Every second of a restore: how much of the checkpoint's `total` bytes CRIU's processes (criu
/// and the tree it is creating, which read the pages themselves) have read so far.
pub fn watch_restore(
    criu: &std::sync::OnceLock<i32>,
    total: u64,
    report: &(impl Fn(String) + Sync),
    done: mpsc::Receiver<()>,
) {
    let started = Instant::now();
    while let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(EVERY) {
        let read = criu.get().map(|pid| read_by_tree(*pid)).unwrap_or(0);
        report(line("restoring", "read", read.min(total), Some(total), started));
    }
}

/// Bytes read so far by `root` and its descendants (`rchar` of /proc/PID/io).
fn read_by_tree(root: i32) -> u64 {
    crate::process::tree::descendants(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/io")).ok())
        .filter_map(|io| io.lines().find_map(|l| l.strip_prefix("rchar:")).and_then(|v| v.trim().parse::<u64>().ok()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_phase_bytes_and_rate() {
        let l = line("restoring", "read", 512 << 20, Some(1 << 30), Instant::now() - Duration::from_secs(1));
        assert!(l.starts_with("Progress: restoring, 512.0 MiB of 1.0 GiB read ("), "{l}");
        assert!(l.contains("MiB/s"), "{l}");
        assert_eq!(phase("verifying", 1 << 30), "Progress: verifying 1.0 GiB");
        assert_eq!(
            waiting("127.0.0.1:6379 to accept connections", Duration::from_millis(3900), Duration::from_secs(30)),
            "Progress: waiting for 127.0.0.1:6379 to accept connections (3 s of 30s)"
        );
    }
}
