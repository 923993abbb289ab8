//! CRIU's log, bounded. criu writes its log to stdout (`--log-file -`), a pipe read here into the
//! log file: the first [`HEAD_CAP`] bytes go to the file as they come; past that only the last
//! [`TAIL_CAP`] bytes are kept (in memory) and appended at the end after a note saying how much
//! was left out. A CRIU spinning in a loop cannot fill the disk or the supervisor's memory.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

pub const HEAD_CAP: usize = 8 << 20;
pub const TAIL_CAP: usize = 4 << 20;

/// The last bytes of the log are also kept in memory, for the error lines: a full disk may have
/// refused the file its end.
const RECENT_CAP: usize = 1 << 20;

pub struct Capture {
    done: mpsc::Receiver<Vec<u8>>,
    /// Dropped by `finish`: ends the pause between reads at once.
    hurry: mpsc::Sender<()>,
}

/// At -v4 criu writes thousands of short lines; read as they come, each one wakes this thread
/// and takes a CPU from the dump or restore (there may be only two). Reading at most this often
/// lets them pile up in the pipe (made large for that) and costs a few wake-ups per run. When
/// criu exits, `finish` ends the pause, so nothing waits for it.
const PACE: Duration = Duration::from_millis(20);
/// The pipe buffer asked for: room for the log written during one pause.
pub const PIPE_SIZE: i32 = 1 << 20;

/// Copies `from` into `path` (mode 0600) until EOF, within the caps.
pub fn spawn(mut from: impl Read + Send + 'static, path: PathBuf) -> Capture {
    let (tx, done) = mpsc::channel();
    let (hurry, hurried) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut pace = true;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ok();
        let mut written = 0usize;
        let mut tail: VecDeque<u8> = VecDeque::new();
        let mut dropped = 0u64;
        let mut recent: VecDeque<u8> = VecDeque::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if pace && n < buf.len() && hurried.recv_timeout(PACE) == Err(mpsc::RecvTimeoutError::Disconnected) {
                pace = false;
            }
            recent.extend(&buf[..n]);
            if recent.len() > RECENT_CAP {
                let excess = recent.len() - RECENT_CAP;
                recent.drain(..excess);
            }
            let mut chunk = &buf[..n];
            if written < HEAD_CAP {
                let take = chunk.len().min(HEAD_CAP - written);
                if let Some(f) = file.as_mut() {
                    let _ = f.write_all(&chunk[..take]);
                }
                written += take;
                chunk = &chunk[take..];
            }
            tail.extend(chunk);
            if tail.len() > TAIL_CAP {
                let excess = tail.len() - TAIL_CAP;
                tail.drain(..excess);
                dropped += excess as u64;
            }
        }
        if let Some(f) = file.as_mut() {
            if dropped > 0 {
                let _ = write!(
                    f,
                    "\n[stasis: {dropped} bytes of CRIU's log were left out here; the log keeps its first {} MiB and last {} MiB]\n",
                    HEAD_CAP >> 20,
                    TAIL_CAP >> 20
                );
            }
            let (a, b) = tail.as_slices();
            let _ = f.write_all(a);
            let _ = f.write_all(b);
        }
        let _ = tx.send(recent.into_iter().collect());
    });
    Capture { done, hurry }
}

impl Capture {
    /// Waits until the log is complete, at most `limit` (a process of the restored tree could in
    /// theory hold the pipe open; then the head of the log is already on disk). Returns the last
    /// MiB of the log.
    pub fn finish(self, limit: Duration) -> Vec<u8> {
        drop(self.hurry);
        self.done.recv_timeout(limit).unwrap_or_default()
    }
}

/// The last `max` bytes of a log file, from a line start: what is worth reading of a long log.
pub fn read_tail(path: &std::path::Path, max: u64) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Ok(if start > 0 { text.split_once('\n').map(|(_, rest)| rest.to_string()).unwrap_or(text) } else { text })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_log_keeps_its_head_and_tail() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("restore.log");
        let mut data = b"CRIU run id = first line\n".to_vec();
        data.resize(HEAD_CAP + TAIL_CAP + 1000, b'x');
        data.extend_from_slice(b"\n(9.9) Error (criu/x.c:1): the end\n");
        let recent = spawn(std::io::Cursor::new(data.clone()), path.clone()).finish(Duration::from_secs(10));
        assert!(recent.len() <= RECENT_CAP && recent.ends_with(b"the end\n"));
        let size = std::fs::metadata(&path).unwrap().len() as usize;
        assert!(size < HEAD_CAP + TAIL_CAP + 200, "bounded: {size}");
        let tail = read_tail(&path, 4096).unwrap();
        assert!(tail.ends_with("Error (criu/x.c:1): the end\n"));
        let all = std::fs::read(&path).unwrap();
        assert!(all.starts_with(b"CRIU run id = first line"));
        assert!(String::from_utf8_lossy(&all).contains("bytes of CRIU's log were left out here"));
    }
}
