//! A checkpoint's images served to CRIU through its image-streamer protocol (the `stream`
//! option), so that each byte is checked against the manifest as CRIU reads it, instead of in a
//! pass over every image before CRIU starts.
//!
//! CRIU is given a fresh private directory that holds only our socket (`streamer-serve.sock`).
//! For each image it wants it sends its name (`img_streamer_request_entry`, a u32-size-prefixed
//! protobuf); we answer whether it exists, and if so CRIU passes us the write end of a pipe
//! (SCM_RIGHTS) from which it reads the plain image. Each such file is served by a thread of its
//! own (CRIU serializes the requests, but several processes of the tree may read at once): the
//! stored bytes are read in 1 MiB groups, each checked against its chunk hash (store::chunks)
//! before any of it is decrypted, decompressed or written into the pipe. A group that fails
//! closes the pipe at once (CRIU fails to read) and is recorded with the file and the offset.
//!
//! [`Streamer::check`] is the gate the restore answers CRIU's `post-restore` and `pre-resume`
//! with: every file CRIU opened checked to its end (what CRIU did not read of it is checked
//! without being written), every image it never asked for checked too, and no failure. A
//! refusal at `post-restore` makes CRIU kill the tree; CRIU ignores one at `pre-resume`, so the
//! restore kills the tree itself then (criu::requests).

use super::rpc::pb;
use crate::store::chunks::{self, VerifiedReader};
use crate::store::compress::StoredName;
use crate::store::verify::ImageProblem;
use crate::store::{seal, Checkpoint};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The socket CRIU connects to in its images directory for a restore (criu/img-streamer.c).
pub const SOCKET: &str = "streamer-serve.sock";
/// No image name CRIU asks for comes near this.
const MAX_REQUEST: usize = 4096;
/// A pipe as large as a group: one write per group.
const PIPE_SIZE: i32 = 1 << 20;
/// An image this small (stored) is served by the thread that answers CRIU's requests.
const SMALL_IMAGE: u64 = 32 << 10;
/// How often a blocked wait looks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

/// Where the plain bytes of an image CRIU asks for come from. Only stored files today; a chain
/// of incremental checkpoints (which CRIU cannot read in stream mode) would be flattened into a
/// source of its own.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file of the checkpoint's `images/`, as stored: maybe compressed, maybe sealed.
    Stored { image: crate::store::ImageFile, name: StoredName },
}

impl Source {
    /// The file named in messages: the manifest's path of the stored file.
    pub fn label(&self) -> &str {
        match self {
            Source::Stored { image, .. } => &image.path,
        }
    }

    /// Whether the plain image surely fits an empty pipe of the default size (64 KiB) at once:
    /// stored neither compressed (its plain size is unknown until read) nor over half of it.
    fn fits_a_pipe(&self) -> bool {
        let Source::Stored { image, name } = self;
        !name.compressed && image.size <= SMALL_IMAGE
    }

    /// The stored bytes, each group checked before it is handed on.
    fn stored(&self, dir: &Path, notes: &Mutex<Vec<String>>) -> Result<Checked, ImageProblem> {
        let Source::Stored { image, .. } = self;
        let unreadable = |error: String| ImageProblem::Unreadable { path: image.path.clone(), error };
        let (verifier, fell_back) = chunks::verifier(dir, image).map_err(|e| match e {
            chunks::ChunkError::Checksum => ImageProblem::Checksum(image.path.clone()),
            chunks::ChunkError::Size { expected, found } => {
                ImageProblem::Size { path: image.path.clone(), expected, found }
            }
            other => unreadable(other.to_string()),
        })?;
        if let Some(why) = fell_back {
            tracing::info!("{}: {why}", image.path);
            notes.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{}: {why}", image.path));
        }
        let file = std::fs::File::open(dir.join(&image.path)).map_err(|e| unreadable(e.to_string()))?;
        let failure = Arc::new(Mutex::new(None));
        Ok(Checked { inner: VerifiedReader::new(file, verifier), failure, path: image.path.clone() })
    }

    /// The plain bytes CRIU reads: the checked stored bytes, opened and decompressed.
    fn plain(
        &self,
        dir: &Path,
        key: Option<&seal::Key>,
        notes: &Mutex<Vec<String>>,
    ) -> Result<(Plain, Failure), ImageProblem> {
        let Source::Stored { image, name } = self;
        let checked = self.stored(dir, notes)?;
        let failure = checked.failure.clone();
        if name.sealed_as.is_none() && !name.compressed {
            // Stored plain: each checked group as it is, without another copy.
            return Ok((Plain::Direct(checked), failure));
        }
        let mut reader: Box<dyn Read + Send> = Box::new(checked);
        if let Some(aad) = &name.sealed_as {
            let key = key.ok_or_else(|| ImageProblem::Undecodable {
                path: image.path.clone(),
                error: "it is encrypted and no key was given".into(),
            })?;
            reader = Box::new(seal::Opener::new(reader, aad, key));
        }
        if name.compressed {
            let z = zstd::stream::read::Decoder::new(reader)
                .map_err(|e| ImageProblem::Undecodable { path: image.path.clone(), error: e.to_string() })?;
            reader = Box::new(z);
        }
        Ok((Plain::Decoded(reader, vec![0u8; chunks::GROUP]), failure))
    }

    /// What a read error of [`Source::plain`]'s reader means: damage the check found, the
    /// stored file unreadable, or checked bytes that do not decrypt or decompress.
    fn problem(&self, e: std::io::Error, failure: &Mutex<Option<ImageProblem>>) -> ImageProblem {
        if let Some(p) = failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return p;
        }
        let error = match e.get_ref().and_then(|i| i.downcast_ref::<seal::OpenError>()) {
            Some(o) => o.to_string(),
            None => e.to_string(),
        };
        ImageProblem::Undecodable { path: self.label().to_string(), error }
    }
}

/// Where a checked reader leaves what went wrong with the stored bytes.
type Failure = Arc<Mutex<Option<ImageProblem>>>;

/// An image's plain bytes, piece by piece, each handed out only once checked.
enum Plain {
    /// Stored plain: the checked groups themselves.
    Direct(Checked),
    /// Opened and decompressed from the checked stored bytes.
    Decoded(Box<dyn Read + Send>, Vec<u8>),
}

impl Plain {
    /// The next piece, or none at the end.
    fn next(&mut self) -> std::io::Result<Option<&[u8]>> {
        match self {
            Plain::Direct(c) => c.next_group(),
            Plain::Decoded(r, buf) => loop {
                match r.read(buf) {
                    Ok(0) => return Ok(None),
                    Ok(n) => return Ok(Some(&buf[..n])),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            },
        }
    }

    /// The next piece into `out`, as much as fills it (all but the last piece fill it): its
    /// length, or none at the end.
    fn next_into(&mut self, out: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self {
            Plain::Direct(c) => c.next_group_into(out),
            Plain::Decoded(r, _) => {
                let mut got = 0;
                while got < out.len() {
                    match r.read(&mut out[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok((got > 0).then_some(got))
            }
        }
    }

    /// All of it into `out`.
    fn copy_to(&mut self, mut out: impl Write) -> Result<(), Copy> {
        while let Some(piece) = self.next().map_err(Copy::Read)? {
            out.write_all(piece).map_err(Copy::Write)?;
        }
        out.flush().map_err(Copy::Write)
    }
}

/// A [`VerifiedReader`] that keeps what went wrong where the reader's owner can see it once the
/// reader is wrapped in a decryption and a decompression.
struct Checked {
    inner: VerifiedReader<std::fs::File>,
    failure: Failure,
    path: String,
}

impl Read for Checked {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(out);
        if let Err(e) = &r {
            self.record(e);
        }
        r
    }
}

impl Checked {
    fn next_group_into(&mut self, out: &mut [u8]) -> std::io::Result<Option<usize>> {
        let r = self.inner.next_group_into(out);
        if let Err(e) = &r {
            self.record(e);
        }
        r
    }

    fn next_group(&mut self) -> std::io::Result<Option<&[u8]>> {
        match self.inner.next_group() {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e) => {
                self.record(&e);
                return Err(e);
            }
        }
        // The group just checked.
        Ok(Some(self.inner.current()))
    }

    fn record(&self, e: &std::io::Error) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            let path = self.path.clone();
            *f = Some(match self.inner.mismatch() {
                Some(m) => ImageProblem::ChunkChecksum { path, at: m.clone() },
                None => ImageProblem::Unreadable { path, error: e.to_string() },
            });
        }
    }
}

/// The gate's verdict and what the restore should say.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The first damage found, if any.
    pub problem: Option<ImageProblem>,
    /// Images whose chunk hashes had to be computed again.
    pub notes: Vec<String>,
    /// Every name CRIU asked for, in order, and whether it exists.
    pub requested: Vec<(String, bool)>,
}

/// One file being served.
struct Serving {
    handle: JoinHandle<()>,
    /// Told at the gate: stop writing, check the rest.
    drain: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    serving: Vec<Serving>,
    /// Images (by the manifest's path) whose stored bytes were all checked.
    checked: BTreeSet<String>,
    problems: Vec<ImageProblem>,
    requested: Vec<(String, bool)>,
}

struct Shared {
    checkpoint_dir: PathBuf,
    /// By the name CRIU asks for.
    sources: BTreeMap<String, Source>,
    /// Images no name leads to (in a subdirectory): checked at the gate.
    unnamed: Vec<Source>,
    key: Option<seal::Key>,
    /// Set when the restore is over: every thread ends, checked or not.
    abandon: AtomicBool,
    /// CRIU's connection, to shut it down at the end.
    conn: Mutex<Option<UnixStream>>,
    state: Mutex<State>,
    notes: Mutex<Vec<String>>,
    /// Buffers handed to CRIU's pipes by reference: freed with the streamer, once CRIU is gone.
    spliced: Mutex<Vec<PageBuf>>,
}

/// The image streamer of one restore. Dropping it ends its threads and removes its directory.
pub struct Streamer {
    dir: PathBuf,
    dir_file: std::fs::File,
    shared: Arc<Shared>,
    control: Option<JoinHandle<()>>,
}

/// Why stasis's own files could not be had.
#[derive(Debug)]
pub enum OwnFilesError {
    /// One of them is not what the manifest says.
    Damaged(ImageProblem),
    /// Writing its plaintext failed (a full `/dev/shm`): this host's, not the checkpoint's.
    Host(String),
}

/// What CRIU asks for that is stasis's, never CRIU's.
fn is_own(name: &str) -> bool {
    name.starts_with("stasis-")
}

impl Streamer {
    /// Listens for CRIU in a new private directory: in RAM (`/dev/shm`) when the checkpoint is
    /// sealed, since stasis's own files are decrypted into it, else beside the checkpoint.
    pub fn start(cp: &Checkpoint, key: Option<seal::Key>) -> std::io::Result<Streamer> {
        let sealed = cp.manifest.encryption.is_some();
        let dir = if sealed {
            let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            Path::new("/dev/shm").join(format!("stasis-stream-{}-{nanos}", std::process::id()))
        } else {
            cp.dir.join(".restore-stream")
        };
        let _ = std::fs::remove_dir_all(&dir);
        crate::store::durable::create_dir_with_mode(&dir, 0o700).map_err(std::io::Error::other)?;
        let dir_file = std::fs::File::open(&dir)?;
        // Through the descriptor: a socket's path must be short, a checkpoint's need not be.
        let listener = UnixListener::bind(format!("/proc/self/fd/{}/{SOCKET}", dir_file.as_raw_fd()))?;
        listener.set_nonblocking(true)?;
        let mut sources = BTreeMap::new();
        let mut unnamed = Vec::new();
        for image in cp.manifest.images.iter().flatten() {
            let stored = image.path.strip_prefix("images/").filter(|n| !n.contains('/'));
            let name = StoredName::of(stored.unwrap_or(&image.path));
            let source = Source::Stored { image: image.clone(), name: name.clone() };
            match stored {
                Some(_) if !sources.contains_key(&name.plain) => {
                    sources.insert(name.plain, source);
                }
                _ => unnamed.push(source),
            }
        }
        let shared = Arc::new(Shared {
            checkpoint_dir: cp.dir.clone(),
            sources,
            unnamed,
            key,
            abandon: AtomicBool::new(false),
            conn: Mutex::new(None),
            state: Mutex::new(State::default()),
            notes: Mutex::new(Vec::new()),
            spliced: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let control = std::thread::Builder::new().name("stasis-streamer".into()).spawn(move || s.control(listener))?;
        Ok(Streamer { dir, dir_file, shared, control: Some(control) })
    }

    /// The directory CRIU is given (it holds only the socket, and CRIU's own local files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// That directory, open: CRIU is given it as `/proc/OUR_PID/fd/N`.
    pub fn dir_fd(&self) -> RawFd {
        self.dir_file.as_raw_fd()
    }

    /// Checks stasis's own files (`stasis-*`: what a reboot removes, files the service writes,
    /// shared memory), which CRIU never asks for and the restore reads before CRIU runs. Sealed
    /// ones are decrypted into the private directory. Returns the directory to read them from.
    pub fn own_files(&mut self, images: &Path) -> Result<PathBuf, OwnFilesError> {
        let own: Vec<(String, Source)> =
            self.shared.sources.iter().filter(|(n, _)| is_own(n)).map(|(n, s)| (n.clone(), s.clone())).collect();
        let sealed = own.iter().any(|(_, Source::Stored { name, .. })| name.sealed_as.is_some());
        for (plain, source) in own {
            let (mut reader, failure) = source
                .plain(&self.shared.checkpoint_dir, self.shared.key.as_ref(), &self.shared.notes)
                .map_err(OwnFilesError::Damaged)?;
            let path = self.dir.join(&plain);
            let host = |e: std::io::Error| OwnFilesError::Host(format!("failed to write {}: {e}", path.display()));
            let result = if sealed {
                let out = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(host)?;
                reader.copy_to(std::io::BufWriter::new(out))
            } else {
                reader.copy_to(std::io::sink())
            };
            match result {
                Ok(()) => {}
                Err(Copy::Read(e)) => return Err(OwnFilesError::Damaged(source.problem(e, &failure))),
                Err(Copy::Write(e)) => return Err(host(e)),
            }
            self.shared.lock().checked.insert(source.label().to_string());
        }
        Ok(if sealed { self.dir.clone() } else { images.to_path_buf() })
    }

    /// The gate: Ok when every file CRIU opened so far was served and checked to its end (what
    /// it did not read is checked now, unwritten), every image it never asked for is checked,
    /// and nothing failed. Called at `post-restore` and again at `pre-resume`: by then CRIU
    /// reads nothing more of what it opened.
    pub fn check(&self) -> Result<(), ImageProblem> {
        self.shared.drain_and_join();
        let unchecked: Vec<Source> = {
            let st = self.shared.lock();
            if let Some(p) = st.problems.first() {
                return Err(p.clone());
            }
            let asked: BTreeSet<&str> = st.requested.iter().map(|(n, _)| n.as_str()).collect();
            let named = self.shared.sources.iter().filter(|(n, _)| !asked.contains(n.as_str())).map(|(_, s)| s);
            named.chain(self.shared.unnamed.iter()).filter(|s| !st.checked.contains(s.label())).cloned().collect()
        };
        for source in unchecked {
            let checked = source.stored(&self.shared.checkpoint_dir, &self.shared.notes).and_then(|mut c| {
                copy(&mut c, std::io::sink()).map(drop).map_err(|e| match e {
                    Copy::Read(e) | Copy::Write(e) => source.problem(e, &c.failure),
                })
            });
            let mut st = self.shared.lock();
            match checked {
                Ok(()) => {
                    st.checked.insert(source.label().to_string());
                }
                Err(problem) => st.problems.push(problem),
            }
        }
        // Whatever CRIU opened meanwhile (nothing, this late in a restore) is judged too.
        while !self.shared.lock().serving.is_empty() {
            self.shared.drain_and_join();
        }
        match self.shared.lock().problems.first() {
            Some(p) => Err(p.clone()),
            None => Ok(()),
        }
    }

    /// Ends the streamer once CRIU is done: stops whatever still runs (a restore that failed
    /// for another reason need not be checked to its end) and returns the verdict so far.
    pub fn finish(mut self) -> Outcome {
        self.stop();
        let st = std::mem::take(&mut *self.shared.lock());
        let mut notes = std::mem::take(&mut *self.shared.notes.lock().unwrap_or_else(|p| p.into_inner()));
        // A file CRIU asked for twice is said once.
        let mut seen = BTreeSet::new();
        notes.retain(|n| seen.insert(n.clone()));
        Outcome { problem: st.problems.into_iter().next(), notes, requested: st.requested }
    }

    fn stop(&mut self) {
        self.shared.abandon.store(true, Ordering::SeqCst);
        if let Some(c) = self.shared.conn.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(h) = self.control.take() {
            let _ = h.join();
        }
        self.shared.drain_and_join();
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Which side of a copy failed.
enum Copy {
    Read(std::io::Error),
    Write(std::io::Error),
}

fn copy(reader: &mut dyn Read, mut out: impl Write) -> Result<u64, Copy> {
    let mut buf = vec![0u8; chunks::GROUP];
    let mut n = 0u64;
    loop {
        let got = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Copy::Read(e)),
        };
        out.write_all(&buf[..got]).map_err(Copy::Write)?;
        n += got as u64;
    }
    out.flush().map_err(Copy::Write)?;
    Ok(n)
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every file being served to stop writing and waits until each is checked (or, once
    /// abandoned, given up).
    fn drain_and_join(&self) {
        let serving = std::mem::take(&mut self.lock().serving);
        for s in &serving {
            s.drain.store(true, Ordering::SeqCst);
        }
        for s in serving {
            let _ = s.handle.join();
        }
    }

    /// Accepts CRIU's one connection and answers its requests until it closes it.
    fn control(self: Arc<Self>, listener: UnixListener) {
        let conn = loop {
            if self.abandon.load(Ordering::SeqCst) {
                return;
            }
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let _ = wait_for(listener.as_fd(), libc::POLLIN, POLL);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("image streamer: accept failed: {e}");
                    return;
                }
            }
        };
        drop(listener);
        if conn.set_nonblocking(false).is_err() {
            return;
        }
        if let Ok(c) = conn.try_clone() {
            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(c);
        }
        if self.abandon.load(Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.answer(&conn) {
            if !self.abandon.load(Ordering::SeqCst) {
                tracing::warn!("image streamer: the conversation with CRIU ended: {e}");
            }
        }
    }

    fn answer(self: &Arc<Self>, mut conn: &UnixStream) -> std::io::Result<()> {
        loop {
            let mut size = [0u8; 4];
            match conn.read_exact(&mut size) {
                Ok(()) => {}
                // CRIU is done (img_streamer_finish), or gone.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let size = u32::from_le_bytes(size) as usize;
            if size > MAX_REQUEST {
                return Err(std::io::Error::other(format!("a request of {size} bytes")));
            }
            let mut body = vec![0u8; size];
            conn.read_exact(&mut body)?;
            let req = pb::ImgStreamerRequestEntry::decode(body.as_slice()).map_err(std::io::Error::other)?;
            let name = req.filename;
            // A plain name only, and never one of stasis's own files.
            let plain = !name.is_empty() && !name.contains('/') && !name.starts_with('.') && !is_own(&name);
            let source = self.sources.get(&name).filter(|_| plain).cloned();
            tracing::debug!(
                "image streamer: CRIU asks for {name}: {}",
                if source.is_some() { "served" } else { "none" }
            );
            let reply = pb::ImgStreamerReplyEntry { exists: source.is_some() }.encode_to_vec();
            let mut msg = (reply.len() as u32).to_le_bytes().to_vec();
            msg.extend_from_slice(&reply);
            conn.write_all(&msg)?;
            let Some(source) = source else {
                self.lock().requested.push((name, false));
                continue;
            };
            let pipe = receive_fd(conn)?;
            if source.fits_a_pipe() {
                // Most images are a few KiB: written whole into the empty pipe, they cannot block,
                // so the request is served here, without a thread or group-sized buffers (a
                // restore asks for dozens of them one after another).
                self.lock().requested.push((name.clone(), true));
                self.serve(&name, &source, pipe, &AtomicBool::new(false));
                continue;
            }
            let drain = Arc::new(AtomicBool::new(false));
            let (me, d, n) = (self.clone(), drain.clone(), name.clone());
            let handle = std::thread::Builder::new()
                .name("stasis-stream-file".into())
                .spawn(move || me.serve(&n, &source, pipe, &d))?;
            // Both at once: the gate never sees a file asked for and not being served.
            let mut st = self.lock();
            st.requested.push((name, true));
            st.serving.push(Serving { handle, drain });
        }
    }

    /// Serves one file into CRIU's pipe, each group checked before it is written. What CRIU
    /// does not read (it closed the pipe, or the gate drains) is checked unwritten.
    fn serve(&self, name: &str, source: &Source, pipe: OwnedFd, drain: &AtomicBool) {
        let small = source.fits_a_pipe();
        let mut writer = Some(if small { PipeWriter::as_it_is(pipe) } else { PipeWriter::new(pipe) });
        let result = (|| -> Result<(), ImageProblem> {
            let (mut reader, failure) = source.plain(&self.checkpoint_dir, self.key.as_ref(), &self.notes)?;
            if !small && writer.as_ref().is_some_and(PipeWriter::splices) {
                return self.serve_spliced(name, source, &mut reader, &failure, &mut writer, drain);
            }
            loop {
                if self.abandon.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let piece = match reader.next() {
                    Ok(None) => return Ok(()),
                    Ok(Some(piece)) => piece,
                    Err(e) => {
                        // Closed before anything else: CRIU must not wait on it.
                        writer = None;
                        return Err(source.problem(e, &failure));
                    }
                };
                if let Some(w) = &mut writer {
                    if let Err(why) = w.write_all(piece, drain, &self.abandon) {
                        tracing::debug!("image streamer: {name}: {why}; checking the rest unwritten");
                        writer = None;
                    }
                }
            }
        })();
        drop(writer);
        if self.abandon.load(Ordering::SeqCst) && result.is_ok() {
            return;
        }
        let mut st = self.lock();
        match result {
            Ok(()) => {
                st.checked.insert(source.label().to_string());
            }
            Err(p) => {
                tracing::warn!("image streamer: {p}");
                st.problems.push(p);
            }
        }
    }
}

impl Shared {
    /// Serves an image in pieces of one group's size (checked stored groups, or what they
    /// decrypt and decompress to), each handed to the pipe by reference (vmsplice) instead of
    /// copied into it: CRIU reads it from our pages. Two buffers take turns: the pipe holds at
    /// most one group (its capacity is one group at most), so once piece k+1 is all in it,
    /// piece k has been read out and its buffer may be filled again. The last, shorter piece
    /// is copied.
    /// Buffers the pipe may still refer to are never reused or freed while it can be read:
    /// they are kept until the streamer ends (after CRIU has exited). This relies on CRIU
    /// copying what it reads from an image (read(2); splice only into a regular file, for a
    /// ghost file, which copies too): no page of ours is moved on into another pipe.
    fn serve_spliced(
        &self,
        name: &str,
        source: &Source,
        plain: &mut Plain,
        failure: &Failure,
        writer: &mut Option<PipeWriter>,
        drain: &AtomicBool,
    ) -> Result<(), ImageProblem> {
        let mut bufs = [PageBuf::new(chunks::GROUP), PageBuf::new(chunks::GROUP)];
        let mut turn = 0;
        let result = loop {
            if self.abandon.load(Ordering::SeqCst) {
                break Ok(());
            }
            let len = match plain.next_into(&mut bufs[turn]) {
                Ok(None) => break Ok(()),
                Ok(Some(len)) => len,
                Err(e) => {
                    *writer = None;
                    break Err(source.problem(e, failure));
                }
            };
            let Some(w) = writer else { continue };
            let piece = &bufs[turn][..len];
            let sent = if len == chunks::GROUP {
                w.splice_all(piece, drain, &self.abandon)
            } else {
                w.write_all(piece, drain, &self.abandon)
            };
            if let Err(why) = sent {
                tracing::debug!("image streamer: {name}: {why}; checking the rest unwritten");
                *writer = None;
                // The pipe may still refer to both buffers: the rest goes through new ones.
                self.spliced.lock().unwrap_or_else(|p| p.into_inner()).extend(bufs);
                bufs = [PageBuf::new(chunks::GROUP), PageBuf::new(chunks::GROUP)];
            }
            turn ^= 1;
        };
        self.spliced.lock().unwrap_or_else(|p| p.into_inner()).extend(bufs);
        result
    }
}

/// Page-aligned memory for one group, so that a group spliced into a pipe takes exactly its
/// pages' worth of the pipe's slots.
struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by the value.
unsafe impl Send for PageBuf {}

impl PageBuf {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> PageBuf {
        let layout = std::alloc::Layout::from_size_align(len, Self::ALIGN).expect("a valid layout");
        // SAFETY: a layout of non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        PageBuf { ptr, len }
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes owned by the value.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, Self::ALIGN).expect("a valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// The write end of CRIU's pipe, written without blocking for good: a write that waits looks
/// every [`POLL`] whether to stop.
struct PipeWriter {
    fd: OwnedFd,
}

impl PipeWriter {
    /// A pipe left at its size (a small image fits), non-blocking all the same.
    fn as_it_is(fd: OwnedFd) -> PipeWriter {
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        PipeWriter { fd }
    }

    fn new(fd: OwnedFd) -> PipeWriter {
        // SAFETY: fcntl on a descriptor we own; a smaller pipe only means more writes.
        unsafe {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE);
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        PipeWriter { fd }
    }

    /// Whether a group may be spliced: the pipe holds one group at most.
    fn splices(&self) -> bool {
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
        size > 0 && size as usize <= chunks::GROUP
    }

    /// Hands `bytes` (page-aligned, whole pages) to the pipe by reference.
    fn splice_all(&mut self, mut bytes: &[u8], drain: &AtomicBool, abandon: &AtomicBool) -> Result<(), String> {
        while !bytes.is_empty() {
            if drain.load(Ordering::SeqCst) || abandon.load(Ordering::SeqCst) {
                return Err("the restore read no more of it".into());
            }
            let iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
            // SAFETY: one iovec over memory the caller keeps unchanged while the pipe refers to it.
            let n = unsafe { libc::vmsplice(self.fd.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
            match n {
                n if n >= 0 => bytes = &bytes[n as usize..],
                _ => match nix::errno::Errno::last() {
                    nix::errno::Errno::EAGAIN => {
                        let _ = wait_for(self.fd.as_fd(), libc::POLLOUT, POLL);
                    }
                    nix::errno::Errno::EINTR => {}
                    nix::errno::Errno::EPIPE => return Err("CRIU closed it".into()),
                    e => return Err(format!("splicing into CRIU's pipe failed: {e}")),
                },
            }
        }
        Ok(())
    }

    fn write_all(&mut self, mut bytes: &[u8], drain: &AtomicBool, abandon: &AtomicBool) -> Result<(), String> {
        while !bytes.is_empty() {
            if drain.load(Ordering::SeqCst) || abandon.load(Ordering::SeqCst) {
                return Err("the restore read no more of it".into());
            }
            match nix::unistd::write(&self.fd, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(nix::errno::Errno::EAGAIN) => {
                    let _ = wait_for(self.fd.as_fd(), libc::POLLOUT, POLL);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EPIPE) => return Err("CRIU closed it".into()),
                Err(e) => return Err(format!("writing to CRIU's pipe failed: {e}")),
            }
        }
        Ok(())
    }
}

/// Polls `fd` for `events` for at most `limit`.
fn wait_for(fd: std::os::fd::BorrowedFd<'_>, events: libc::c_short, limit: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    // SAFETY: one pollfd we own.
    match unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) } {
        n if n >= 0 => Ok(n > 0),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The descriptor CRIU passes after a request that exists (criu/img-streamer.c send_fd: one
/// byte of data and one SCM_RIGHTS descriptor).
fn receive_fd(conn: &UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(conn.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: descriptors the kernel just installed for us; each is owned once.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if msg.bytes == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "CRIU closed the connection"));
    }
    let mut fds = fds.into_iter();
    let fd = fds.next().ok_or_else(|| std::io::Error::other("CRIU sent no pipe"))?;
    // Anything more is dropped (closed).
    Ok(fd)
}

/// What the probe found for one CRIU binary.
#[derive(serde::Serialize, serde::Deserialize)]
struct Probed {
    path: PathBuf,
    key: String,
    streams: bool,
}

impl super::Criu {
    /// Whether this CRIU can be served a restore's images over RPC. Upstream CRIU 4.2.1 opens
    /// an RPC request's images directory with no direction (cr-service.c), and a request with
    /// `stream` then dies in BUG() (img-streamer.c, socket_name_for_mode) before it connects;
    /// scripts/criu-patches/0003-rpc-image-streamer.patch fixes that. Found by trying once per
    /// binary (a restore request that finds no images), remembered in `cache`.
    pub fn streams_restores(&self, cache: &Path) -> bool {
        let key = super::binary::file_key(&self.path);
        let remembered = std::fs::read(cache).ok().and_then(|b| serde_json::from_slice::<Probed>(&b).ok());
        if let (Some(k), Some(p)) = (&key, &remembered) {
            if p.path == self.path && &p.key == k {
                return p.streams;
            }
        }
        let streams = match probe(&self.path) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("failed to find out whether {} can stream images: {e}", self.path.display());
                return false;
            }
        };
        if let Some(key) = key {
            if let Some(dir) = cache.parent() {
                let _ = crate::store::durable::create_dir_with_mode(dir, 0o700);
            }
            let entry = Probed { path: self.path.clone(), key, streams };
            let _ = crate::store::durable::write_atomic_with(
                cache,
                &serde_json::to_vec(&entry).unwrap_or_default(),
                crate::store::durable::Durability::None,
            );
        }
        streams
    }
}

/// Asks `criu` for a streamed restore from an empty streamer: one that can connects and asks
/// for its first image (which does not exist, so the restore fails at once).
fn probe(criu: &Path) -> std::io::Result<bool> {
    use std::time::Instant;
    let dir = tempfile_dir()?;
    let result = (|| {
        std::fs::write(dir.join("probe.conf"), "stream\n")?;
        let listener = UnixListener::bind(dir.join(SOCKET))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut swrk = super::rpc::Swrk::start(criu, &[], None, deadline).map_err(std::io::Error::other)?;
        // An unpatched CRIU aborts: no core file of it.
        let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: prlimit on our own child, with a limit we own.
        unsafe { libc::prlimit(swrk.pid(), libc::RLIMIT_CORE, &none, std::ptr::null_mut()) };
        let connected = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (c, d) = (connected.clone(), done.clone());
        let answering = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        c.store(true, Ordering::SeqCst);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        let mut size = [0u8; 4];
                        if conn.read_exact(&mut size).is_ok() {
                            let mut body = vec![0u8; (u32::from_le_bytes(size) as usize).min(MAX_REQUEST)];
                            let _ = conn.read_exact(&mut body);
                            let reply = pb::ImgStreamerReplyEntry { exists: false }.encode_to_vec();
                            let mut msg = (reply.len() as u32).to_le_bytes().to_vec();
                            msg.extend_from_slice(&reply);
                            let _ = conn.write_all(&msg);
                        }
                        return;
                    }
                    Err(_) => {
                        let _ = wait_for(listener.as_fd(), libc::POLLIN, POLL);
                    }
                }
            }
        });
        let opts = pb::CriuOpts {
            images_dir_fd: -1,
            images_dir: Some(dir.display().to_string()),
            log_to_stderr: Some(true),
            notify_scripts: Some(true),
            config_file: Some(dir.join("probe.conf").display().to_string()),
            ..Default::default()
        };
        let req = pb::CriuReq { r#type: pb::CriuReqType::Restore as i32, opts: Some(opts), ..Default::default() };
        let _ = swrk.call(&req, &mut |_| super::rpc::Answer::Proceed);
        let _ = swrk.finish();
        done.store(true, Ordering::SeqCst);
        let _ = answering.join();
        Ok(connected.load(Ordering::SeqCst))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("stasis-criu-probe-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::store::durable::create_dir_with_mode(&dir, 0o700).map_err(std::io::Error::other)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::ServicePaths;
    use crate::store::{CheckpointStore, Manifest};
    use std::os::fd::FromRawFd;

    const M: usize = chunks::GROUP;

    fn pages(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096 % 251) as u8 ^ (i % 7) as u8).collect()
    }

    /// A checkpoint as a dump leaves it, through the store's own finalize (compression,
    /// sealing, hashes and chunk hashes).
    fn checkpoint(root: &Path, files: &[(&str, Vec<u8>)], compress: bool, key: Option<&seal::Key>) -> Checkpoint {
        let paths = ServicePaths { root: root.to_path_buf(), lock: root.join("l"), control_socket: root.join("s") };
        let store = CheckpointStore::new(&paths);
        let pending = store.begin(store.take_generation().unwrap()).unwrap();
        for (name, bytes) in files {
            std::fs::write(pending.images_dir().join(name), bytes).unwrap();
        }
        let mut draft: Manifest = serde_json::from_value(serde_json::json!({
            "format": 2, "id": pending.id, "generation": 1, "service": "s", "kind": "stop", "created_at": "t",
            "stasis_version": "0", "criu_version": "4.2.1", "init_binary": "/i", "stdout_pipe_inode": 1, "size_bytes": 0,
            "executables": [], "config_digest": "c", "kernel_version": "k",
        }))
        .unwrap();
        if compress {
            draft.compression = Some(crate::store::Compression { algorithm: "zstd".into(), level: 1 });
        }
        if let Some(k) = key {
            draft.encryption = Some(crate::store::Encryption { algorithm: "xchacha20poly1305".into(), key_id: k.id() });
        }
        pending.write_draft(&draft).unwrap();
        pending.finalize_sealed(key, &[]).unwrap()
    }

    /// What CRIU does: one connection, a request per image, a pipe per image that exists.
    struct FakeCriu(UnixStream);

    impl FakeCriu {
        fn connect(s: &Streamer) -> FakeCriu {
            FakeCriu(UnixStream::connect(s.dir().join(SOCKET)).unwrap())
        }

        /// The read end of the image's pipe, or None when the streamer says it does not exist.
        fn open(&mut self, name: &str) -> Option<std::fs::File> {
            let req = pb::ImgStreamerRequestEntry { filename: name.into() }.encode_to_vec();
            let mut msg = (req.len() as u32).to_le_bytes().to_vec();
            msg.extend_from_slice(&req);
            self.0.write_all(&msg).unwrap();
            let mut size = [0u8; 4];
            self.0.read_exact(&mut size).unwrap();
            let mut body = vec![0u8; u32::from_le_bytes(size) as usize];
            self.0.read_exact(&mut body).unwrap();
            if !pb::ImgStreamerReplyEntry::decode(body.as_slice()).unwrap().exists {
                return None;
            }
            let (r, w) = nix::unistd::pipe().unwrap();
            let fds = [w.as_raw_fd()];
            let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
            let iov = [std::io::IoSlice::new(&[0u8])];
            nix::sys::socket::sendmsg::<()>(self.0.as_raw_fd(), &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None)
                .unwrap();
            drop(w);
            // SAFETY: the read end we own, handed over once.
            Some(unsafe { std::fs::File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(r)) })
        }

        fn read(&mut self, name: &str) -> Vec<u8> {
            let mut out = Vec::new();
            let _ = self.open(name).unwrap_or_else(|| panic!("{name} exists")).read_to_end(&mut out);
            out
        }
    }

    fn flip(cp: &Checkpoint, stored: &str, at: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(cp.images_dir().join(stored)).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    }

    #[test]
    fn compressed_and_sealed_images_are_served_plain_and_checked() {
        for (compress, sealed) in [(false, false), (true, false), (false, true), (true, true)] {
            let d = tempfile::tempdir().unwrap();
            let key = seal::Key::from_bytes([3; 32]);
            let big = pages(3 * M + 100);
            let files = [
                ("pages-1.img", big.clone()),
                ("core-1.img", b"core".to_vec()),
                ("stasis-written.0", b"log\n".to_vec()),
            ];
            let cp = checkpoint(d.path(), &files, compress, sealed.then_some(&key));
            let mut s = Streamer::start(&cp, sealed.then(|| seal::Key::from_bytes([3; 32]))).unwrap();
            let own = s.own_files(&cp.images_dir()).unwrap();
            assert_eq!(std::fs::read(own.join("stasis-written.0")).unwrap(), b"log\n", "{compress} {sealed}");
            assert_eq!(own == s.dir(), sealed, "decrypted into the private directory only when sealed");
            let mut criu = FakeCriu::connect(&s);
            assert_eq!(criu.read("core-1.img"), b"core");
            assert!(criu.read("pages-1.img") == big, "{compress} {sealed}: the plain pages");
            assert!(criu.open("seccomp.img").is_none(), "an image the dump did not write");
            assert!(criu.open("stasis-written.0").is_none(), "stasis's own files are not CRIU's");
            assert!(criu.open("../images/core-1.img").is_none());
            assert_eq!(criu.read("core-1.img"), b"core", "a file asked for twice is served twice");
            assert_eq!(s.check(), Ok(()));
            drop(criu);
            let out = s.finish();
            assert_eq!(out.problem, None);
            assert!(out.notes.is_empty(), "the chunk hashes were there: {:?}", out.notes);
            assert_eq!(out.requested.iter().filter(|(_, e)| *e).count(), 3);
        }
    }

    /// Groups handed to the pipe by reference are never overwritten before they are read: a
    /// slow reader, in small reads, gets every byte right.
    #[test]
    fn a_slow_reader_gets_every_byte_of_a_spliced_image() {
        for (compress, sealed) in [(false, false), (true, false), (false, true), (true, true)] {
            let d = tempfile::tempdir().unwrap();
            let key = seal::Key::from_bytes([9; 32]);
            let big = pages(9 * M + 5);
            let cp = checkpoint(d.path(), &[("pages-1.img", big.clone())], compress, sealed.then_some(&key));
            let s = Streamer::start(&cp, sealed.then(|| seal::Key::from_bytes([9; 32]))).unwrap();
            let mut criu = FakeCriu::connect(&s);
            let mut pipe = criu.open("pages-1.img").unwrap();
            let (mut got, mut buf) = (Vec::new(), vec![0u8; 3000]);
            loop {
                let n = pipe.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() % (256 << 10) < n {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            assert!(got == big, "{compress} {sealed}: {} bytes, the same: {}", got.len(), got == big);
            assert_eq!(s.check(), Ok(()));
        }
    }

    #[test]
    fn a_damaged_group_is_never_written_and_closes_the_pipe() {
        for sealed in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let key = seal::Key::from_bytes([5; 32]);
            let big = pages(4 * M);
            let cp = checkpoint(d.path(), &[("pages-1.img", big.clone())], false, sealed.then_some(&key));
            let stored = if sealed { "pages-1.img.enc" } else { "pages-1.img" };
            flip(&cp, stored, 2 * M as u64 + 10);
            let s = Streamer::start(&cp, sealed.then(|| seal::Key::from_bytes([5; 32]))).unwrap();
            let mut criu = FakeCriu::connect(&s);
            let got = criu.read("pages-1.img");
            // Sealed chunks straddle groups: the chunk ending in the bad group is not opened.
            let good = if sealed { M - 24 - 2 * 16 } else { 2 * M };
            assert!(got.len() <= good, "{sealed}: {} bytes reached CRIU", got.len());
            assert_eq!(got[..], big[..got.len()], "only checked bytes");
            let err = s.check().unwrap_err();
            match &err {
                ImageProblem::ChunkChecksum { path, at } => {
                    assert_eq!(path, &format!("images/{stored}"));
                    assert_eq!(at.offset, 2 * M as u64);
                }
                other => panic!("{other}"),
            }
            let text = err.to_string();
            assert!(text.contains(&format!("images/{stored}")) && text.contains(&format!("bytes {}", 2 * M)), "{text}");
        }
    }

    #[test]
    fn what_criu_leaves_unread_or_never_asks_for_is_checked_at_the_gate() {
        let d = tempfile::tempdir().unwrap();
        let big = pages(4 * M);
        let cp = checkpoint(d.path(), &[("pages-1.img", big.clone()), ("mm-1.img", pages(2 * M + 3))], false, None);
        let s = Streamer::start(&cp, None).unwrap();
        let mut criu = FakeCriu::connect(&s);
        // CRIU reads the first bytes and keeps the pipe open: the gate checks the rest.
        let mut pipe = criu.open("pages-1.img").unwrap();
        let mut head = [0u8; 100];
        pipe.read_exact(&mut head).unwrap();
        assert_eq!(s.check(), Ok(()), "all intact, read or not");
        drop(pipe);
        // Damage where CRIU did not read, and in a file it never asked for.
        let d2 = tempfile::tempdir().unwrap();
        let cp2 = checkpoint(d2.path(), &[("pages-1.img", big), ("mm-1.img", pages(2 * M + 3))], false, None);
        flip(&cp2, "mm-1.img", M as u64 + 1);
        let s2 = Streamer::start(&cp2, None).unwrap();
        let mut criu2 = FakeCriu::connect(&s2);
        assert_eq!(criu2.read("pages-1.img").len(), 4 * M);
        let err = s2.check().unwrap_err();
        assert!(
            matches!(&err, ImageProblem::ChunkChecksum { path, at } if path == "images/mm-1.img" && at.offset == M as u64),
            "{err}"
        );
        assert_eq!(s2.finish().problem, Some(err), "the verdict stands");
    }

    #[test]
    fn a_missing_or_damaged_sidecar_is_computed_again_and_said() {
        let d = tempfile::tempdir().unwrap();
        let big = pages(2 * M + 1);
        let cp = checkpoint(d.path(), &[("pages-1.img", big.clone())], false, None);
        let side = chunks::sidecar_path(&cp.dir, "images/pages-1.img").unwrap();
        std::fs::remove_file(&side).unwrap();
        let s = Streamer::start(&cp, None).unwrap();
        assert!(FakeCriu::connect(&s).read("pages-1.img") == big);
        assert_eq!(s.check(), Ok(()));
        let out = s.finish();
        assert!(out.notes.iter().any(|n| n.contains("images/pages-1.img") && n.contains("missing")), "{:?}", out.notes);
    }
}
