//! `stasis logs NAME`: the service's output and the supervisor's notes, from `service.log`.

use crate::config::load_named;
use crate::error::Error;
use crate::exit_codes;
use crate::paths::Dirs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

pub fn run(dirs: &Dirs, name: &str, lines: Option<usize>, follow: bool) -> Result<i32, Error> {
    // The state directory is root-only: without root every service would look stopped.
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let path = dirs.service(&service.name).service_log();
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => {
            eprintln!(
                "{} has no log yet ({} does not exist); it is created at the first start",
                service.name,
                path.display()
            );
            return Ok(exit_codes::OK);
        }
        Err(e) => return Err(Error::io("open", &path, e)),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(|e| Error::io("read", &path, e))?;
    let start = match lines {
        Some(n) => tail_offset(&text, n),
        None => 0,
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(&text[start..]);
    let _ = out.flush();
    if !follow {
        return Ok(exit_codes::OK);
    }
    let mut pos = text.len() as u64;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(pos);
        if len < pos {
            pos = 0;
        }
        if len > pos {
            let _ = file.seek(SeekFrom::Start(pos));
            let mut chunk = Vec::new();
            let _ = (&mut file).take(len - pos).read_to_end(&mut chunk);
            pos += chunk.len() as u64;
            if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                return Ok(exit_codes::OK);
            }
        }
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
