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
    file: Arc<Mutex<File>>,
    /// Also print notes on stderr (the journal, under systemd).
    mirror: bool,
}

impl LogWriter {
    pub fn open(path: &Path, mirror: bool) -> std::io::Result<LogWriter> {
        let f = OpenOptions::new().append(true).create(true).mode(0o640).open(path)?;
        Ok(LogWriter { file: Arc::new(Mutex::new(f)), mirror })
    }

    /// A line from stasis itself, marked so it cannot be mistaken for the service's output.
    pub fn note(&self, msg: &str) {
        let line = format!("[stasis {}] {msg}\n", crate::time_fmt::rfc3339_utc(std::time::SystemTime::now()));
        self.write(line.as_bytes());
        if self.mirror {
            eprintln!("{msg}");
        }
    }

    fn write(&self, bytes: &[u8]) {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(bytes) {
            tracing::warn!("failed to write to the service log: {e}");
        }
    }
}

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
