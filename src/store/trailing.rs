//! Hashing memory images while CRIU is still writing them. CRIU writes each `pages-N.img`
//! front to back (splice at the file position, never a seek back), so the bytes below a file's
//! current size are final: they can be hashed as they arrive, and only the last stretch is left
//! when CRIU is done. On a dump of 1 GiB that takes the ~0.2 s BLAKE3 pass off the time after
//! CRIU. The result is only a shortcut: a file whose size at the end differs from what was read
//! is hashed again from the start by the caller, as if it had not been followed.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Files below this are hashed at the end as before: following them saves nothing.
const FOLLOW_FROM: u64 = 4 << 20;
/// Read and hashed at a time.
const CHUNK: usize = 1 << 20;

struct Followed {
    file: File,
    hasher: blake3::Hasher,
    hashed: u64,
}

/// The images of one dump being followed.
#[derive(Default)]
pub struct Trailing {
    files: BTreeMap<PathBuf, Followed>,
    buf: Vec<u8>,
}

/// A file's size and BLAKE3 (hex), read to its end after CRIU finished.
pub type Prehashed = BTreeMap<PathBuf, (u64, String)>;

impl Trailing {
    pub fn new() -> Trailing {
        Trailing { files: BTreeMap::new(), buf: vec![0u8; CHUNK] }
    }

    /// Hashes what was appended to the memory images in `images` since the last call; returns
    /// how many bytes that was (0: caught up).
    pub fn feed(&mut self, images: &Path) -> u64 {
        if let Ok(rd) = std::fs::read_dir(images) {
            for e in rd.filter_map(Result::ok) {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let path = e.path();
                if !(name.starts_with("pages-") && name.ends_with(".img")) || self.files.contains_key(&path) {
                    continue;
                }
                if e.metadata().is_ok_and(|m| m.is_file() && m.len() >= FOLLOW_FROM) {
                    if let Ok(file) = File::open(&path) {
                        self.files.insert(path, Followed { file, hasher: blake3::Hasher::new(), hashed: 0 });
                    }
                }
            }
        }
        let mut total = 0;
        for f in self.files.values_mut() {
            let Ok(size) = f.file.metadata().map(|m| m.len()) else { continue };
            total += read_up_to(f, size, &mut self.buf);
        }
        total
    }

    /// Reads every followed file to its end and gives each one's size and hash.
    pub fn finish(mut self) -> Prehashed {
        let mut out = Prehashed::new();
        for (path, mut f) in std::mem::take(&mut self.files) {
            let Ok(size) = f.file.metadata().map(|m| m.len()) else { continue };
            read_up_to(&mut f, size, &mut self.buf);
            if f.hashed == size {
                out.insert(path, (size, f.hasher.finalize().to_hex().to_string()));
            }
        }
        out
    }
}

/// Where the post-dump hook of a stopping dump asks the supervisor for these hashes: a socket
/// in the pending checkpoint's directory (root-only, like the directory).
pub const SOCKET: &str = "hashes.sock";

/// The hook's side: the hashes the supervisor took while CRIU wrote, or none if it cannot tell
/// (no socket, no answer in time): the caller then hashes everything itself, as before.
pub fn ask(dir: &Path) -> Prehashed {
    use std::io::Write;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(dir.join(SOCKET)) else { return Prehashed::new() };
    // Finishing is reading the last stretch CRIU wrote; a stalled supervisor must not stall the
    // hook (the service is frozen meanwhile): hashing it all here is the fallback.
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(30)));
    let mut text = Vec::new();
    if s.write_all(b"finish\n").is_err() || (&mut s).take(MAX_ANSWER + 1).read_to_end(&mut text).is_err() {
        return Prehashed::new();
    }
    // Longer than any true answer: not one to trust, nor to keep reading.
    if text.len() as u64 > MAX_ANSWER {
        return Prehashed::new();
    }
    serde_json::from_slice(&text).unwrap_or_default()
}

/// The longest answer the hook reads: about 5,000 followed images (each over 4 MiB).
const MAX_ANSWER: u64 = 1 << 20;

/// The supervisor's side: follows the images until `done` is set or the hook asks through
/// `listener`, then gives every followed file's size and hash (to the hook too, if it asked).
pub fn follow(
    images: &Path,
    listener: Option<&std::os::unix::net::UnixListener>,
    done: &std::sync::atomic::AtomicBool,
) -> Prehashed {
    use std::io::Write;
    let mut t = Trailing::new();
    if let Some(l) = listener {
        let _ = l.set_nonblocking(true);
    }
    loop {
        if let Some(Ok((mut s, _))) = listener.map(|l| l.accept()) {
            let _ = s.set_nonblocking(false);
            let mut line = [0u8; 7];
            let _ = s.read_exact(&mut line);
            // The hook (and the frozen service) wait on this now: full priority for the rest.
            // SAFETY: setpriority on this thread's own id.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 0) };
            // CRIU is done writing: an image not followed yet is read whole now.
            t.feed(images);
            let finished = t.finish();
            let _ = s.write_all(&serde_json::to_vec(&finished).unwrap_or_default());
            return finished;
        }
        if done.load(std::sync::atomic::Ordering::Acquire) {
            t.feed(images);
            return t.finish();
        }
        // Caught up: CRIU writes about 1 GiB/s here, so a short nap loses nothing.
        if t.feed(images) == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

fn read_up_to(f: &mut Followed, size: u64, buf: &mut [u8]) -> u64 {
    let start = f.hashed;
    while f.hashed < size {
        let want = ((size - f.hashed) as usize).min(buf.len());
        match f.file.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                f.hasher.update(&buf[..n]);
                f.hashed += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Left unfinished: finish() will not vouch for this file.
            Err(_) => {
                f.hashed = u64::MAX;
                break;
            }
        }
    }
    f.hashed.saturating_sub(start).min(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_hook_gets_the_hashes_through_the_socket_and_none_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let content = vec![7u8; 5 << 20];
        std::fs::write(images.join("pages-1.img"), &content).unwrap();
        assert!(ask(dir.path()).is_empty(), "no supervisor, no hashes");
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET)).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (theirs, mine) = std::thread::scope(|s| {
            let h = s.spawn(|| follow(&images, Some(&listener), &done));
            (ask(dir.path()), h.join().unwrap())
        });
        assert_eq!(theirs, mine);
        assert_eq!(theirs[&images.join("pages-1.img")].1, blake3::hash(&content).to_hex().to_string());
    }

    // Found by fuzz_hook_hashes_answer: the hook read the supervisor's answer to its end, 24 MiB
    // of it into memory, with the service frozen.
    #[test]
    fn an_answer_too_long_to_be_true_is_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET)).unwrap();
        let supervisor = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read_exact(&mut [0u8; 7]);
            let _ = s.write_all(b"{\"/x\": [1, \"00\"]}");
            let _ = std::io::copy(&mut std::io::repeat(b' ').take(24 << 20), &mut s);
        });
        let (answer, peak) = crate::fuzz::peak_heap(|| ask(dir.path()));
        supervisor.join().unwrap();
        assert!(answer.is_empty());
        assert!(peak < 4 << 20, "{peak} bytes of heap");
    }

    #[test]
    fn a_file_hashed_while_it_grows_has_the_hash_of_its_whole_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        let small = dir.path().join("pages-2.img");
        std::fs::write(&small, b"too small to follow").unwrap();
        let content: Vec<u8> = (0..(9u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut out = File::create(&path).unwrap();
        let mut t = Trailing::new();
        let mut fed = 0;
        for part in content.chunks(3 << 20) {
            out.write_all(part).unwrap();
            fed += t.feed(dir.path());
        }
        assert!(fed > 0, "hashed while it grew");
        out.write_all(b"the last stretch").unwrap();
        let mut whole = content.clone();
        whole.extend_from_slice(b"the last stretch");
        let done = t.finish();
        assert_eq!(done.len(), 1, "only the big image is followed: {done:?}");
        assert_eq!(done[&path], (whole.len() as u64, blake3::hash(&whole).to_hex().to_string()));
    }
}
