//! The service's stdout/stderr: a pipe whose read end the supervisor holds, copied line by line
//! to `service.log`. Supervisor notes go to the same file between whole lines, so the log tells
//! the whole story (`stasis logs NAME`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncReadExt;

#[derive(Clone)]
pub struct LogWriter {
    inner: Arc<Mutex<Rotating>>,
    /// Also print notes on stderr (the journal, under systemd).
    mirror: bool,
}

/// `service.log`, rotated to `service.log.1` ... `.KEEP` when it passes `max_bytes`.
struct Rotating {
    path: std::path::PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

impl Rotating {
    fn open(path: &Path) -> std::io::Result<File> {
        OpenOptions::new().append(true).create(true).mode(0o640).custom_flags(libc::O_NOFOLLOW).open(path)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let name = |n: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            std::path::PathBuf::from(p)
        };
        let _ = std::fs::remove_file(name(self.keep));
        for n in (1..self.keep).rev() {
            let _ = std::fs::rename(name(n), name(n + 1));
        }
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            std::fs::rename(&self.path, name(1))?;
        }
        self.file = Rotating::open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl LogWriter {
    pub fn open(path: &Path, mirror: bool, max_bytes: u64, keep: usize) -> std::io::Result<LogWriter> {
        let file = Rotating::open(path)?;
        let size = file.metadata()?.len();
        let r = Rotating { path: path.to_path_buf(), file, size, max_bytes, keep };
        Ok(LogWriter { inner: Arc::new(Mutex::new(r)), mirror })
    }

    /// A line from stasis itself, marked so it cannot be mistaken for the service's output.
    /// Notes quote CRIU and the service (file names, error lines): each line is escaped.
    pub fn note(&self, msg: &str) {
        let msg = &*crate::text::escape_lines(msg);
        let line = format!("[stasis {}] {msg}\n", crate::time_fmt::rfc3339_utc(std::time::SystemTime::now()));
        self.write(line.as_bytes());
        if self.mirror {
            eprintln!("{msg}");
        }
    }

    fn write(&self, bytes: &[u8]) {
        let mut r = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if r.size > 0 && r.size + bytes.len() as u64 > r.max_bytes {
            if let Err(e) = r.rotate() {
                tracing::warn!("failed to rotate the service log: {e}");
            }
        }
        match r.file.write_all(bytes) {
            Ok(()) => r.size += bytes.len() as u64,
            Err(e) => tracing::warn!("failed to write to the service log: {e}"),
        }
    }
}

/// A line longer than this is split: the pump's memory stays bounded whatever the service writes.
pub const MAX_LINE: usize = 64 * 1024;

/// Copies the pipe to the log until every writer has closed it (EOF).
pub fn spawn_pump(output: OwnedFd, log: LogWriter) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(output) {
            Ok(rx) => rx,
            Err(e) => {
                log.note(&format!("failed to read the service's output: {e}"));
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        let mut partial: Vec<u8> = Vec::new();
        loop {
            match rx.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    partial.extend_from_slice(&buf[..n]);
                    if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
                        log.write(&partial[..=end]);
                        partial.drain(..=end);
                    }
                    while partial.len() >= MAX_LINE {
                        let mut piece: Vec<u8> = partial.drain(..MAX_LINE).collect();
                        piece.push(b'\n');
                        log.write(&piece);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log.note(&format!("failed to read the service's output: {e}"));
                    break;
                }
            }
        }
        if !partial.is_empty() {
            partial.push(b'\n');
            log.write(&partial);
        }
    })
}
