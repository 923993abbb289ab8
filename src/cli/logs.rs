//! `stasis logs NAME`: the service's output and the supervisor's notes, from `service.log`.

use super::error::Error;
use super::exit_codes;
use crate::config::load_named;
use crate::paths::Dirs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;

pub fn run(dirs: &Dirs, name: &str, lines: Option<usize>, follow: bool) -> Result<i32, Error> {
    // The state directory is root-only: without root every service would look stopped.
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let path = dirs.service(&service.name).service_log();
    // Watch before reading, so nothing written in between is missed.
    let watch = if follow { Some(Watch::new(&path)?) } else { None };
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if !follow {
                eprintln!(
                    "{} has no log yet ({} does not exist); it is created at the first start",
                    service.name,
                    path.display()
                );
                return Ok(exit_codes::OK);
            }
            None
        }
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    let mut text = Vec::new();
    if let Some(f) = file.as_mut() {
        f.read_to_end(&mut text).map_err(|e| Error::io("read", &path, e))?;
    }
    let start = match lines {
        Some(n) => tail_offset(&text, n),
        None => 0,
    };
    let mut out = Output::new();
    let _ = out.write_all(&text[start..]);
    let _ = out.flush();
    let Some(watch) = watch else { return Ok(exit_codes::OK) };
    loop {
        // Blocks until the directory changes: no polling.
        watch.wait()?;
        // Rotated (service.log.1 now) or created: start over on the new file.
        let current = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let open = file.as_ref().and_then(|f| f.metadata().ok()).map(|m| (m.dev(), m.ino()));
        if current != open {
            if let Some(f) = file.as_mut() {
                let _ = copy_new(f, &mut out);
            }
            file = std::fs::File::open(&path).ok();
        }
        if let Some(f) = file.as_mut() {
            if copy_new(f, &mut out).is_err() {
                return Ok(exit_codes::OK);
            }
        }
    }
}

/// stdout for the log: a terminal sees the service's control characters escaped (they could
/// rewrite the screen); a pipe gets the bytes as written.
struct Output {
    out: std::io::StdoutLock<'static>,
    escape: bool,
}

impl Output {
    fn new() -> Output {
        use std::io::IsTerminal;
        let out = std::io::stdout().lock();
        let escape = out.is_terminal();
        Output { out, escape }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if !self.escape {
            return self.out.write_all(buf);
        }
        let text = String::from_utf8_lossy(buf);
        self.out.write_all(crate::text::escape_lines(&text).as_bytes())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Copies what was appended since the last read.
fn copy_new(f: &mut std::fs::File, out: &mut impl Write) -> std::io::Result<()> {
    let mut chunk = Vec::new();
    f.read_to_end(&mut chunk)?;
    if !chunk.is_empty() {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// inotify on the log's directory: writes, and the renames and creations of rotation.
struct Watch(nix::sys::inotify::Inotify);

impl Watch {
    fn new(path: &std::path::Path) -> Result<Watch, Error> {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let err = |e: nix::Error| Error::io("watch", dir, std::io::Error::from(e));
        let ino = Inotify::init(InitFlags::IN_CLOEXEC).map_err(err)?;
        let flags = AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CLOSE_WRITE;
        ino.add_watch(dir, flags).map_err(err)?;
        Ok(Watch(ino))
    }

    fn wait(&self) -> Result<(), Error> {
        self.0.read_events().map(|_| ()).map_err(|e| Error::io("watch", "the service log", std::io::Error::from(e)))
    }
}

/// Byte offset where the last `n` lines start.
fn tail_offset(text: &[u8], n: usize) -> usize {
    if n == 0 {
        return text.len();
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    body.iter().enumerate().rev().filter(|(_, b)| **b == b'\n').nth(n - 1).map(|(i, _)| i + 1).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::tail_offset;

    #[test]
    fn tails() {
        let t = b"a\nb\nc\n";
        assert_eq!(&t[tail_offset(t, 2)..], b"b\nc\n");
        assert_eq!(&t[tail_offset(t, 5)..], b"a\nb\nc\n");
        assert_eq!(tail_offset(t, 0), t.len());
    }
}
