//! Lazy restore's memory, served by stasis (`restore: lazy`). CRIU restores the tree with its
//! private anonymous memory registered for userfaultfd and hands each process's userfaultfd to a
//! `criu lazy-pages` daemon (criu/uffd.c: `setup_uffd`, `send_uffd`; the restorer closes its own
//! copy). That daemon asks for pages over CRIU's page-server protocol (`--page-server
//! --ps-socket FD`: one end of a socket pair whose other end is ours), on a fault first and,
//! once CRIU said the restore finished, for every page left in the background. This module owns
//! everything of that but the supervisor's decisions:
//!
//! - the private directory the restore and the daemon read (every image but the pages in plain,
//!   checked; each `pages-N.img` a sparse file holding only the pages CRIU restores itself, the
//!   ones not flagged `PE_LAZY`), because CRIU cannot read lazy restores from the image streamer
//!   (pagemap.c: a skipped lazy run advances `pi_off` without reading the pipe);
//! - the daemon, and the answers to its `PS_IOV_GET`: every byte comes from the stored pages,
//!   each 1 MiB chunk checked against its chunk hash before it is decrypted, decompressed or
//!   sent;
//! - the second reference to each userfaultfd ([`LazyPages::hold_uffds`], taken before the tree
//!   resumes with `pidfd_getfd`): without it a daemon that dies takes the only reference with it,
//!   the kernel unregisters the ranges, and every page not yet copied reads as zeros. With it a
//!   fault waits, and the supervisor kills the tree ([`LazyPages::wait`] says when).

use crate::store::chunks::{self, ChunkVerifier, VerifiedReader};
use crate::store::compress::StoredName;
use crate::store::images::{PAGE, PE_LAZY, PE_PARENT, PE_PRESENT};
use crate::store::random::RandomImage;
use crate::store::verify::ImageProblem;
use crate::store::{seal, Checkpoint, ImageFile};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const PS_IOV_ADD_F: u32 = 6;
const PS_IOV_GET: u32 = 7;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;
const PS_CMD_BITS: u32 = 16;
/// `struct page_server_iov`: u32 cmd, 4 bytes of padding, u64 nr_pages, vaddr, dst_id.
const IOV_SIZE: usize = 32;
/// The most pages one answer carries (the daemon takes fewer than it asked for and asks again):
/// small enough that a fault behind a background answer waits little (256 KiB).
const MAX_ANSWER_PAGES: u64 = 64;
/// The daemon's log, beside `restore.log` in the restore's work directory.
pub const LAZY_LOG: &str = "lazy-pages.log";
/// Where the restore and the daemon meet: CRIU names it relative to its work directory.
const LAZY_SOCKET: &str = "lazy-pages.socket";
const USERFAULTFD: &str = "anon_inode:[userfaultfd]";
/// How often the daemon's descriptors are looked at for a new userfaultfd (a fork) meanwhile.
const RESCAN: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A stored image is not what the manifest says (or does not decrypt or decompress).
    #[error("{0}")]
    Damaged(ImageProblem),
    #[error("failed to write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("failed to read the pagemap {path}: {why}")]
    Pagemap { path: String, why: String },
    #[error("failed to start {path} lazy-pages: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("failed to start the lazy-pages daemon: it exited before it was ready (see {log})")]
    NotReady { log: PathBuf },
    #[error("failed to hear from the lazy-pages daemon within {0:?}")]
    Silent(Duration),
    #[error(
        "failed to serve the lazy-pages daemon: it closed its page-server socket before all pages were in (it died)"
    )]
    Closed,
    #[error("failed to serve the lazy-pages daemon: {0}")]
    Socket(std::io::Error),
    #[error("failed to serve the lazy-pages daemon: it asked for {0}")]
    Protocol(String),
    #[error("failed to take a reference to the lazy-pages daemon's userfaultfds: {0}")]
    Uffd(String),
    #[error("{0}")]
    Guard(super::lazy_guard::GuardError),
    #[error("failed to complete the lazy restore: the lazy-pages daemon {0}")]
    DaemonExit(String),
}

impl LazyError {
    /// What proves the checkpoint damaged, as opposed to a failure of the daemon or the host.
    pub fn damage(&self) -> Option<&ImageProblem> {
        match self {
            LazyError::Damaged(p) => Some(p),
            _ => None,
        }
    }
}

/// One pages image's plain bytes, read at any offset, each byte checked before it is handed out.
enum PagesFile {
    /// Read where each page is, each piece checked (and opened, decoded) on its own: plain,
    /// sealed, or compressed in frames (store::random).
    Random(Box<RandomImage>),
    /// Compressed or sealed: decoded front to back by a thread of its own into memory (a memfd,
    /// never the disk), each chunk checked before it is decoded; readers wait for their bytes.
    Decoded { memfd: std::fs::File, progress: Arc<(Mutex<Decoding>, Condvar)> },
}

#[derive(Default)]
struct Decoding {
    /// Plain bytes decoded so far.
    upto: u64,
    /// Set when the decoder stops: Ok at the end, else what it met.
    end: Option<Result<(), ImageProblem>>,
}

impl PagesFile {
    fn open(dir: &Path, image: &ImageFile, name: &StoredName, key: Option<&seal::Key>) -> Result<Self, LazyError> {
        let (verifier, _) = chunk_verifier(dir, image)?;
        let file = std::fs::File::open(dir.join(&image.path)).map_err(|e| unreadable(image, e))?;
        let random = RandomImage::open(file, verifier, &image.path, name.sealed_as.as_deref(), name.compressed, key);
        if let Some(random) = random.map_err(LazyError::Damaged)? {
            return Ok(PagesFile::Random(Box::new(random)));
        }
        // Compressed in one stream (before seek tables): decoded front to back.
        let reader = plain_reader(dir, image, name, key)?;
        let memfd =
            memfd(&name.plain).map_err(|source| LazyError::Write { path: name.plain.clone().into(), source })?;
        let progress = Arc::new((Mutex::new(Decoding::default()), Condvar::new()));
        let (out, p, label) = (memfd.try_clone().map_err(|e| unreadable(image, e))?, progress.clone(), image.clone());
        std::thread::Builder::new()
            .name("stasis-lazy-decode".into())
            .spawn(move || decode(reader, out, &p, &label))
            .map_err(|e| unreadable(image, e))?;
        Ok(PagesFile::Decoded { memfd, progress })
    }

    /// `out.len()` plain bytes at `offset`, checked; waits at most until `deadline` for a decoder.
    fn read_at(&self, offset: u64, out: &mut [u8], deadline: Instant) -> Result<(), LazyError> {
        match self {
            PagesFile::Random(image) => image.read_at(offset, out).map_err(LazyError::Damaged),
            PagesFile::Decoded { memfd, progress } => {
                let want = offset + out.len() as u64;
                let (lock, cond) = &**progress;
                let mut d = lock.lock().unwrap_or_else(|p| p.into_inner());
                while d.upto < want {
                    match &d.end {
                        Some(Err(problem)) => return Err(LazyError::Damaged(problem.clone())),
                        Some(Ok(())) => {
                            return Err(LazyError::Protocol(format!("plain bytes up to {want}, past the end")))
                        }
                        None => {}
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(LazyError::Silent(Duration::ZERO));
                    }
                    d = cond.wait_timeout(d, left).unwrap_or_else(|p| p.into_inner()).0;
                }
                drop(d);
                memfd.read_exact_at(out, offset).map_err(LazyError::Socket)
            }
        }
    }
}

/// The decoder thread's body: plain bytes into `out`, the watermark moved after each piece.
fn decode(mut reader: Checked, mut out: std::fs::File, progress: &(Mutex<Decoding>, Condvar), image: &ImageFile) {
    let mut buf = vec![0u8; chunks::GROUP];
    let end = loop {
        match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]) {
                    break Err(ImageProblem::Unreadable { path: image.path.clone(), error: e.to_string() });
                }
                let mut d = progress.0.lock().unwrap_or_else(|p| p.into_inner());
                d.upto += n as u64;
                progress.1.notify_all();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(reader.problem(&e)),
        }
    };
    progress.0.lock().unwrap_or_else(|p| p.into_inner()).end = Some(end);
    progress.1.notify_all();
}

/// A stored image's plain bytes, in order, each chunk checked before it is opened or decompressed.
struct Checked {
    inner: Box<dyn Read + Send>,
    failure: Arc<Mutex<Option<ImageProblem>>>,
    path: String,
}

impl Read for Checked {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(out)
    }
}

impl Checked {
    /// What a read error means: the damage the check found, else bytes that do not decode.
    fn problem(&self, e: &std::io::Error) -> ImageProblem {
        if let Some(p) = self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return p;
        }
        ImageProblem::Undecodable { path: self.path.clone(), error: e.to_string() }
    }
}

/// Keeps the check's verdict where [`Checked::problem`] finds it under the decoders.
struct Recording {
    inner: VerifiedReader<std::fs::File>,
    failure: Arc<Mutex<Option<ImageProblem>>>,
    path: String,
}

impl Read for Recording {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let r = self.inner.read(out);
        if let Err(e) = &r {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            let path = self.path.clone();
            *f = Some(match self.inner.mismatch() {
                Some(at) => ImageProblem::ChunkChecksum { path, at: at.clone() },
                None => ImageProblem::Unreadable { path, error: e.to_string() },
            });
        }
        r
    }
}

fn plain_reader(
    dir: &Path,
    image: &ImageFile,
    name: &StoredName,
    key: Option<&seal::Key>,
) -> Result<Checked, LazyError> {
    let (verifier, _) = chunk_verifier(dir, image)?;
    let file = std::fs::File::open(dir.join(&image.path)).map_err(|e| unreadable(image, e))?;
    let failure = Arc::new(Mutex::new(None));
    let checked =
        Recording { inner: VerifiedReader::new(file, verifier), failure: failure.clone(), path: image.path.clone() };
    let mut inner: Box<dyn Read + Send> = Box::new(checked);
    let undecodable = |error: String| LazyError::Damaged(ImageProblem::Undecodable { path: image.path.clone(), error });
    if let Some(aad) = &name.sealed_as {
        let key = key.ok_or_else(|| undecodable("it is encrypted and no key was given".into()))?;
        inner = Box::new(seal::Opener::new(inner, aad, key));
    }
    if name.compressed {
        inner = Box::new(zstd::stream::read::Decoder::new(inner).map_err(|e| undecodable(e.to_string()))?);
    }
    Ok(Checked { inner, failure, path: image.path.clone() })
}

fn chunk_verifier(dir: &Path, image: &ImageFile) -> Result<(ChunkVerifier, Option<String>), LazyError> {
    chunks::verifier(dir, image).map_err(|e| {
        LazyError::Damaged(match e {
            chunks::ChunkError::Checksum => ImageProblem::Checksum(image.path.clone()),
            chunks::ChunkError::Size { expected, found } => {
                ImageProblem::Size { path: image.path.clone(), expected, found }
            }
            other => ImageProblem::Unreadable { path: image.path.clone(), error: other.to_string() },
        })
    })
}

fn unreadable(image: &ImageFile, e: std::io::Error) -> LazyError {
    LazyError::Damaged(ImageProblem::Unreadable { path: image.path.clone(), error: e.to_string() })
}

fn memfd(name: &str) -> std::io::Result<std::fs::File> {
    let c = std::ffi::CString::new(format!("stasis-lazy-{name}")).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create with a valid C string; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// One run of a process's pages: where it is in memory and in its pages file's plain bytes.
#[derive(Debug, Clone, Copy)]
struct Run {
    vaddr: u64,
    pages: u64,
    offset: u64,
    pages_id: u32,
}

/// What the daemon can ask for: each process's (by its pagemap's id) runs, by address.
#[derive(Default)]
struct Index {
    runs: BTreeMap<u64, Vec<Run>>,
    files: BTreeMap<u32, PagesFile>,
    /// Pages the daemon may ask for (every lazy page).
    lazy_pages: u64,
}

impl Index {
    fn find(&self, id: u64, vaddr: u64) -> Option<Run> {
        let runs = self.runs.get(&id)?;
        let i = runs.partition_point(|r| r.vaddr <= vaddr).checked_sub(1)?;
        let r = runs[i];
        (vaddr < r.vaddr + r.pages * PAGE && vaddr % PAGE == 0).then_some(r)
    }
}

/// Transfer counters, for the log and the status.
#[derive(Debug, Default)]
pub struct Progress {
    pub pages_sent: AtomicU64,
    pub lazy_pages: AtomicU64,
}

/// Plain images for a lazy restore (see the module doc), with what the daemon will be served.
pub struct Prepared {
    pub dir: PathBuf,
    index: Index,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes the private directory of `cp`'s plain images but the pages (see [`LazyPages::start`]):
/// in RAM (`/dev/shm`) when sealed.
pub fn prepare(cp: &Checkpoint, key: Option<&seal::Key>) -> Result<Prepared, LazyError> {
    let dir = if cp.manifest.encryption.is_some() {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        Path::new("/dev/shm").join(format!("stasis-lazy-{}-{nanos}", std::process::id()))
    } else {
        cp.dir.join(".restore-lazy")
    };
    let _ = std::fs::remove_dir_all(&dir);
    crate::store::durable::create_dir_with_mode(&dir, 0o700)
        .map_err(|e| LazyError::Write { path: dir.clone(), source: std::io::Error::other(e.to_string()) })?;
    let mut prepared = Prepared { dir, index: Index::default() };
    let mut pages = BTreeMap::new();
    for image in cp.manifest.images.iter().flatten() {
        let Some(stored) = image.path.strip_prefix("images/").filter(|n| !n.contains('/')) else { continue };
        let name = StoredName::of(stored);
        if name.plain.starts_with("pages-") {
            pages.insert(name.plain.clone(), (image.clone(), name));
            continue;
        }
        let path = prepared.dir.join(&name.plain);
        let write = |source| LazyError::Write { path: path.clone(), source };
        let mut reader = plain_reader(&cp.dir, image, &name, key)?;
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(write)?;
        let copied = std::io::copy(&mut reader, &mut out);
        if let Err(e) = copied {
            return Err(match e.kind() {
                std::io::ErrorKind::StorageFull => write(e),
                _ => LazyError::Damaged(reader.problem(&e)),
            });
        }
    }
    for (plain, (image, name)) in pages {
        let id: u32 = plain.trim_start_matches("pages-").trim_end_matches(".img").parse().unwrap_or(0);
        prepared.index.files.insert(id, PagesFile::open(&cp.dir, &image, &name, key)?);
    }
    Ok(prepared)
}

impl Prepared {
    /// Reads every pagemap: lazy runs go to the index, the others into the sparse pages files.
    fn fill(&mut self, deadline: Instant) -> Result<(), LazyError> {
        let names: Vec<String> = std::fs::read_dir(&self.dir)
            .map_err(|source| LazyError::Write { path: self.dir.clone(), source })?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("pagemap-") && n.ends_with(".img"))
            .collect();
        let mut sizes: BTreeMap<u32, u64> = BTreeMap::new();
        for name in names {
            let (pages_id, runs) = crate::store::images::pagemap_runs(&self.dir, &name)
                .map_err(|e| LazyError::Pagemap { path: format!("images/{name}"), why: e.to_string() })?;
            let task: Option<u64> = name.strip_prefix("pagemap-").and_then(|n| n.strip_suffix(".img")?.parse().ok());
            let mut offset = 0u64;
            for (vaddr, nr, flags) in runs {
                // Pages held by a parent checkpoint are not in this pages file: serving them
                // from it would hand out another page's bytes. Chains are restored in full.
                if flags & PE_PARENT != 0 {
                    return Err(LazyError::Pagemap {
                        path: format!("images/{name}"),
                        why:
                            "it names pages held by a parent checkpoint (an incremental checkpoint is restored in full)"
                                .into(),
                    });
                }
                if flags & PE_PRESENT == 0 {
                    continue;
                }
                let run = Run { vaddr, pages: nr, offset, pages_id };
                match (flags & PE_LAZY != 0, task) {
                    (true, Some(task)) => {
                        self.index.runs.entry(task).or_default().push(run);
                        self.index.lazy_pages += nr;
                    }
                    _ => self.copy_run(&run, deadline)?,
                }
                offset += nr * PAGE;
            }
            sizes.insert(pages_id, offset);
        }
        for runs in self.index.runs.values_mut() {
            runs.sort_by_key(|r| r.vaddr);
        }
        for (id, size) in sizes {
            let path = self.dir.join(format!("pages-{id}.img"));
            let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&path);
            f.and_then(|f| f.set_len(size.max(f.metadata()?.len())))
                .map_err(|source| LazyError::Write { path: path.clone(), source })?;
        }
        Ok(())
    }

    /// A run CRIU restores itself, into the sparse pages file at its place.
    fn copy_run(&self, run: &Run, deadline: Instant) -> Result<(), LazyError> {
        let source = self.index.files.get(&run.pages_id).ok_or_else(|| LazyError::Pagemap {
            path: format!("images/pages-{}.img", run.pages_id),
            why: "a pagemap names it and the checkpoint has no such pages file".into(),
        })?;
        let path = self.dir.join(format!("pages-{}.img", run.pages_id));
        let write = |source| LazyError::Write { path: path.clone(), source };
        let out = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(write)?;
        let mut buf = vec![0u8; chunks::GROUP];
        let (mut at, end) = (run.offset, run.offset + run.pages * PAGE);
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            source.read_at(at, &mut buf[..n], deadline)?;
            out.write_all_at(&buf[..n], at).map_err(write)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// The daemon of one lazy restore, and the thread that answers it.
pub struct LazyPages {
    child: std::process::Child,
    server: Option<std::thread::JoinHandle<Result<(), LazyError>>>,
    held: Vec<OwnedFd>,
    /// A process of its own holding the same references, for when the supervisor dies.
    guard: Option<super::lazy_guard::Guard>,
    /// What the guard keeps besides: our end of the daemon's page-server socket, and a pidfd
    /// of the daemon.
    for_guard: (RawFd, Option<OwnedFd>),
    /// The daemon has been waited for: its pid (and group id) may be someone else's now.
    reaped: bool,
    pub progress: Arc<Progress>,
    /// What went wrong before the tree resumed (the gate's refusal), for the restore to report.
    pub failure: Option<LazyError>,
    /// The restored tree's root, once CRIU said it (`post-restore`).
    pub root: Option<i32>,
    started: Instant,
    work_dir: PathBuf,
    prepared: Arc<Prepared>,
}

impl LazyPages {
    /// Starts `criu lazy-pages` in `work_dir` (where the restore will look for its socket) on
    /// the images of `prepared`, and waits until it listens. `stall` bounds every wait on it.
    /// The pages CRIU restores itself are put in place (by `deadline`) while the daemon starts:
    /// it reads only the other images before it is ready.
    pub fn start(
        criu: &Path,
        mut prepared: Prepared,
        work_dir: &Path,
        stall: Duration,
        deadline: Instant,
    ) -> Result<LazyPages, LazyError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let _ = std::fs::remove_file(work_dir.join(LAZY_SOCKET));
        let spawn = |source| LazyError::Spawn { path: criu.to_path_buf(), source };
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| spawn(e.into()))?;
        let (status_r, status_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn(e.into()))?;
        let mut cmd = std::process::Command::new(criu);
        cmd.args(["--no-default-config", "lazy-pages", "--page-server", "-v4"])
            .arg("--ps-socket")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--status-fd")
            .arg(status_w.as_raw_fd().to_string())
            .arg("-D")
            .arg(&prepared.dir)
            .arg("-W")
            .arg(work_dir)
            .arg("-o")
            .arg(LAZY_LOG)
            .env_clear()
            .env("PATH", crate::config::DEFAULT_PATH)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // Its own group: a signal meant for the supervisor's never reaches it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = {
            let _a = super::rpc::Inherit::new(theirs.as_raw_fd()).map_err(spawn)?;
            let _b = super::rpc::Inherit::new(status_w.as_raw_fd()).map_err(spawn)?;
            cmd.spawn().map_err(spawn)?
        };
        drop((theirs, status_w));
        let mut child = child;
        if let Err(e) = prepared.fill(deadline) {
            // The group, as in kill(): the leader is not reaped yet.
            // SAFETY: kill(2) with no memory arguments.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        let prepared = Arc::new(prepared);
        let progress = Arc::new(Progress::default());
        progress.lazy_pages.store(prepared.index.lazy_pages, Ordering::Relaxed);
        let mut lazy = LazyPages {
            child,
            server: None,
            held: Vec::new(),
            guard: None,
            for_guard: (-1, None),
            reaped: false,
            progress,
            failure: None,
            root: None,
            started: Instant::now(),
            work_dir: work_dir.to_path_buf(),
            prepared: prepared.clone(),
        };
        if !ready(&status_r, stall).map_err(spawn)? {
            lazy.kill();
            return Err(LazyError::NotReady { log: work_dir.join(LAZY_LOG) });
        }
        let (p, sock) = (lazy.progress.clone(), UnixStream::from(ours));
        // Our child, not yet reaped: the pid is the daemon's until we wait for it.
        let daemon = crate::process::tree::pidfd(lazy.pid());
        // For the guard: with the socket still open in it, a supervisor that dies does not
        // close the daemon's page server, and the guard ends the daemon first.
        lazy.for_guard = (sock.as_raw_fd(), daemon.as_ref().and_then(|d| d.try_clone().ok()));
        let server = std::thread::Builder::new()
            .name("stasis-lazy-pages".into())
            .spawn(move || {
                let served = serve(sock.try_clone(), &prepared.index, &p, stall);
                if served.is_err() {
                    // Before our end closes: a daemon whose page server is gone answers the
                    // faults on pages it no longer has a request for with zeros (criu/uffd.c
                    // handle_page_fault: uffd_zero for an address not in its list). Dead, it
                    // answers nothing, and the held references keep the faults waiting.
                    end_daemon(daemon.as_ref());
                }
                drop(sock);
                served
            })
            .map_err(spawn)?;
        lazy.server = Some(server);
        Ok(lazy)
    }

    /// The daemon's pid (tests and the log).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The plain images the restore reads.
    pub fn dir(&self) -> &Path {
        &self.prepared.dir
    }

    /// Why the daemon or its server ended before the tree resumed, if they did.
    pub fn ended_early(&mut self) -> Option<LazyError> {
        if self.server_done() {
            if let Some(Err(e)) = self.server.take().map(|s| s.join().unwrap_or(Err(LazyError::Closed))) {
                return Some(e);
            }
        }
        match self.try_reap() {
            Some(status) => Some(LazyError::DaemonExit(format!("ended with {status} during the restore"))),
            _ => None,
        }
    }

    /// Takes our own reference to every userfaultfd the daemon holds, once it holds one for
    /// each live process of the tree under `root` (it receives them before CRIU's `pre-resume`;
    /// one it already closed belongs to a process whose every page is in), or once it has
    /// started asking for pages (it has received all it will by then).
    pub fn hold_uffds(&mut self, root: i32, limit: Duration) -> Result<usize, LazyError> {
        let expected =
            crate::process::tree::descendants(root).into_iter().filter(|p| crate::process::tree::alive(*p)).count();
        let deadline = Instant::now() + limit;
        let daemon = self.pid();
        let pidfd =
            crate::process::tree::pidfd(daemon).ok_or_else(|| LazyError::Uffd("no pidfd for the daemon".into()))?;
        loop {
            let fds = uffd_fds(daemon);
            let asking = self.progress.pages_sent.load(Ordering::Relaxed) > 0;
            if fds.len() >= expected || asking || self.server_done() {
                for fd in fds {
                    if let Some(held) = getfd(&pidfd, fd) {
                        self.held.push(held);
                    }
                }
                tracing::debug!("lazy restore: holding {} userfaultfds of {expected} processes", self.held.len());
                let (socket, daemon) = (self.for_guard.0, self.for_guard.1.as_ref().map(|d| d.as_raw_fd()));
                let guard =
                    super::lazy_guard::Guard::start(root, &self.held, socket, daemon).map_err(LazyError::Guard)?;
                self.guard = Some(guard);
                // The restore connected long ago: the socket's name is of no more use.
                let _ = std::fs::remove_file(self.work_dir.join(LAZY_SOCKET));
                return Ok(self.held.len());
            }
            if Instant::now() >= deadline || self.try_reap().is_some() {
                return Err(LazyError::Uffd(format!(
                    "the daemon holds {} of the {expected} it was to receive",
                    fds.len()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes a reference to each userfaultfd of the daemon's that none held already is.
    fn hold_new(&mut self) {
        let Some(pidfd) = crate::process::tree::pidfd(self.pid()) else { return };
        for fd in uffd_fds(self.pid()) {
            // Unknown (kcmp failed) counts as held: never a copy taken again every round.
            if !self.held.iter().any(|h| same_file(h, self.pid(), fd) != Some(false)) {
                if let Some(held) = getfd(&pidfd, fd) {
                    tracing::debug!("lazy restore: holding a new userfaultfd of the daemon's (fd {fd})");
                    if let Some(guard) = &self.guard {
                        guard.keep(&held);
                    }
                    self.held.push(held);
                }
            }
        }
    }

    fn server_done(&self) -> bool {
        self.server.as_ref().is_some_and(|s| s.is_finished())
    }

    /// Waits for the transfer's end: Ok once the daemon said every page is in and exited 0.
    /// The references to the userfaultfds are dropped only then; on an error they are still
    /// held, so the caller kills the tree first and then drops this.
    pub fn wait(&mut self) -> Result<Duration, LazyError> {
        // A process that forks meanwhile gets a userfaultfd of its own, which the daemon
        // receives with the fork event: it is held too, soon after (not at once: a daemon that
        // dies within that moment leaves the child's missing pages to read as zeros).
        while !self.server_done() {
            self.hold_new();
            std::thread::sleep(RESCAN);
        }
        let served = match self.server.take() {
            Some(s) => s.join().unwrap_or_else(|_| Err(LazyError::Protocol("nothing: the server panicked".into()))),
            None => Err(LazyError::Closed),
        };
        if let Err(e) = served {
            self.kill();
            return Err(e);
        }
        let status = match crate::process::tree::exits_within(self.pid(), Duration::from_secs(30)) {
            true => {
                let status = self.child.wait().map_err(|e| LazyError::DaemonExit(e.to_string()))?;
                self.reaped = true;
                status
            }
            false => {
                self.kill();
                return Err(LazyError::DaemonExit("did not exit after it said it was done".into()));
            }
        };
        if !status.success() {
            return Err(LazyError::DaemonExit(format!("ended with {status}")));
        }
        self.held.clear();
        self.guard = None;
        Ok(self.started.elapsed())
    }

    fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // Its whole group (its own, process_group(0)): criu forks helpers while it probes the
        // kernel, and one left behind by a daemon killed at that moment would live on. The
        // leader is not reaped yet, so its pid (the group's id) is no one else's.
        // SAFETY: kill(2) with no memory arguments.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// The daemon's exit status if it has exited (and is reaped now).
    fn try_reap(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        self.reaped |= status.is_some();
        status
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether the daemon wrote its ready byte to the status pipe within `limit`.
fn ready(status: &OwnedFd, limit: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd { fd: status.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = limit.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd we own.
    if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
        return Ok(false);
    }
    let mut b = [0u8; 1];
    Ok(nix::unistd::read(status, &mut b).map_err(std::io::Error::from)? == 1)
}

/// The daemon's descriptors that are userfaultfds.
fn uffd_fds(pid: i32) -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == USERFAULTFD))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether our `held` and descriptor `fd` of process `pid` are the same open file (kcmp); None
/// when the kernel does not say.
fn same_file(held: &OwnedFd, pid: i32, fd: RawFd) -> Option<bool> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp with no memory arguments.
    let r = unsafe {
        libc::syscall(libc::SYS_kcmp, std::process::id() as libc::pid_t, pid, KCMP_FILE, held.as_raw_fd(), fd)
    };
    (r >= 0).then_some(r == 0)
}

/// A copy of the daemon's descriptor `fd`, when it still is a userfaultfd.
fn getfd(pidfd: &OwnedFd, fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: pidfd_getfd with no memory arguments; the new descriptor is owned below.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as i32;
    if got < 0 {
        return None;
    }
    // SAFETY: a new descriptor nothing else owns (pidfd_getfd sets close-on-exec).
    let owned = unsafe { OwnedFd::from_raw_fd(got) };
    let link = std::fs::read_link(format!("/proc/self/fd/{got}")).ok()?;
    (link.as_os_str() == USERFAULTFD).then_some(owned)
}

/// SIGKILLs the daemon (our child, not yet reaped) and waits a while until it is gone.
fn end_daemon(pidfd: Option<&OwnedFd>) {
    if let Some(fd) = pidfd {
        crate::process::tree::kill_pidfd_and_wait(fd, Duration::from_secs(5));
    }
}

/// Answers the daemon until it says it is done: Ok then, else why not.
fn serve(
    sock: std::io::Result<UnixStream>,
    index: &Index,
    progress: &Progress,
    stall: Duration,
) -> Result<(), LazyError> {
    let mut sock = sock.map_err(LazyError::Socket)?;
    let mut buf = vec![0u8; (MAX_ANSWER_PAGES * PAGE) as usize];
    sock.set_read_timeout(Some(stall)).map_err(LazyError::Socket)?;
    sock.set_write_timeout(Some(stall)).map_err(LazyError::Socket)?;
    loop {
        let mut b = [0u8; IOV_SIZE];
        if let Err(e) = sock.read_exact(&mut b) {
            return Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => LazyError::Closed,
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => LazyError::Silent(stall),
                _ => LazyError::Socket(e),
            });
        }
        let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let cmd = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) & ((1 << PS_CMD_BITS) - 1);
        let (nr, vaddr, id) = (word(8), word(16), word(24));
        match cmd {
            PS_IOV_GET => {
                let run = index.find(id, vaddr).ok_or_else(|| {
                    LazyError::Protocol(format!(
                        "{nr} pages at {vaddr:#x} of process {id}, which the checkpoint does not hold lazily"
                    ))
                })?;
                let n = nr.min(run.vaddr + run.pages * PAGE - vaddr).min(MAX_ANSWER_PAGES);
                let n = n.min((run.vaddr + run.pages * PAGE - vaddr) / PAGE).max(1);
                let bytes = &mut buf[..(n * PAGE) as usize];
                let file = index
                    .files
                    .get(&run.pages_id)
                    .ok_or_else(|| LazyError::Protocol(format!("pages file {}", run.pages_id)))?;
                file.read_at(run.offset + (vaddr - run.vaddr), bytes, Instant::now() + stall)?;
                let mut head = (PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS)).to_le_bytes().to_vec();
                head.extend([0u8; 4]);
                for v in [n, vaddr, id] {
                    head.extend(v.to_le_bytes());
                }
                sock.write_all(&head).and_then(|()| sock.write_all(bytes)).map_err(|e| gone(e, stall))?;
                progress.pages_sent.fetch_add(n, Ordering::Relaxed);
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                sock.write_all(&0i32.to_le_bytes()).map_err(LazyError::Socket)?;
                return Ok(());
            }
            other => return Err(LazyError::Protocol(format!("the unknown command {other:#x}"))),
        }
    }
}

/// A write that failed because the daemon is gone is the daemon's end, and one that timed out
/// its silence, not a socket error.
fn gone(e: std::io::Error, stall: Duration) -> LazyError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => LazyError::Closed,
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => LazyError::Silent(stall),
        _ => LazyError::Socket(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One process (pagemap id 7) with a lazy run of 300 pages at 0x10000, its pages the
    /// first 300 pages of a plain stored file of `bytes`.
    fn index(dir: &Path, bytes: &[u8]) -> Index {
        let path = dir.join("pages-1.img");
        std::fs::write(&path, bytes).unwrap();
        let (size, root, cvs) = chunks::hash_file(&path).unwrap();
        let verifier = ChunkVerifier::new(root, size, cvs).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let image = RandomImage::open(file, verifier, "images/pages-1.img", None, false, None).unwrap();
        let pages = PagesFile::Random(Box::new(image.expect("plain images are read anywhere")));
        let mut index = Index::default();
        index.runs.insert(7, vec![Run { vaddr: 0x10000, pages: 300, offset: 0, pages_id: 1 }]);
        index.files.insert(1, pages);
        index
    }

    fn iov(cmd: u32, nr: u64, vaddr: u64, id: u64) -> Vec<u8> {
        let mut b = cmd.to_le_bytes().to_vec();
        b.extend([0u8; 4]);
        for v in [nr, vaddr, id] {
            b.extend(v.to_le_bytes());
        }
        b
    }

    #[test]
    fn a_get_is_answered_with_checked_pages_and_a_close_ends_the_transfer() {
        let d = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = (0..300 * PAGE as usize).map(|i| (i / 4096 + i % 251) as u8).collect();
        let index = index(d.path(), &bytes);
        let (ours, mut daemon) = UnixStream::pair().unwrap();
        let progress = Progress::default();
        std::thread::scope(|s| {
            let server = s.spawn(|| serve(Ok(ours), &index, &progress, Duration::from_secs(10)));
            // 100 pages from page 200: more than one answer carries, and they end with the run.
            daemon.write_all(&iov(PS_IOV_GET, 100, 0x10000 + 200 * PAGE, 7)).unwrap();
            let mut head = [0u8; IOV_SIZE];
            daemon.read_exact(&mut head).unwrap();
            let n = u64::from_le_bytes(head[8..16].try_into().unwrap());
            assert_eq!(n, MAX_ANSWER_PAGES, "fewer pages than asked for, as CRIU's page server may");
            assert_eq!(u32::from_le_bytes(head[..4].try_into().unwrap()), PS_IOV_ADD_F | (PE_PRESENT << 16));
            let mut got = vec![0u8; (n * PAGE) as usize];
            daemon.read_exact(&mut got).unwrap();
            assert_eq!(got, bytes[(200 * PAGE) as usize..((200 + n) * PAGE) as usize]);
            daemon.write_all(&iov(PS_IOV_FORCE_CLOSE, 0, 0, 0)).unwrap();
            let mut status = [1u8; 4];
            daemon.read_exact(&mut status).unwrap();
            assert_eq!(i32::from_le_bytes(status), 0);
            assert!(server.join().unwrap().is_ok());
        });
        assert_eq!(progress.pages_sent.load(Ordering::Relaxed), MAX_ANSWER_PAGES);
    }

    #[test]
    fn a_damaged_chunk_or_a_page_not_held_lazily_is_never_answered() {
        let d = tempfile::tempdir().unwrap();
        let bytes = vec![5u8; 300 * PAGE as usize];
        let index = index(d.path(), &bytes);
        // Damage the second 1 MiB chunk after its hash was taken.
        let f = std::fs::OpenOptions::new().write(true).open(d.path().join("pages-1.img")).unwrap();
        f.write_all_at(&[6], (1 << 20) + 10).unwrap();
        let ask = |get: Vec<u8>| {
            let (ours, mut daemon) = UnixStream::pair().unwrap();
            daemon.write_all(&get).unwrap();
            let r = serve(Ok(ours), &index, &Progress::default(), Duration::from_secs(10));
            let mut rest = Vec::new();
            daemon.set_nonblocking(true).unwrap();
            let _ = daemon.read_to_end(&mut rest);
            (r, rest)
        };
        let (r, sent) = ask(iov(PS_IOV_GET, 1, 0x10000 + 256 * PAGE, 7));
        assert!(matches!(&r, Err(LazyError::Damaged(ImageProblem::ChunkChecksum { .. }))), "{r:?}");
        assert!(sent.is_empty(), "not a byte of it was sent");
        let (r, _) = ask(iov(PS_IOV_GET, 1, 0x10000 + 300 * PAGE, 7));
        assert!(matches!(r, Err(LazyError::Protocol(_))), "past the run: {r:?}");
        let (r, _) = ask(iov(PS_IOV_GET, 1, 0x10000, 8));
        assert!(matches!(r, Err(LazyError::Protocol(_))), "another process: {r:?}");
        let (ours, daemon) = UnixStream::pair().unwrap();
        drop(daemon);
        let r = serve(Ok(ours), &index, &Progress::default(), Duration::from_secs(10));
        assert!(matches!(r, Err(LazyError::Closed)), "the daemon gone: {r:?}");
    }
}
