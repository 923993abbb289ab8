//! A warm CRIU for the next dump. Every criu run first probes the kernel's features (a network
//! namespace and a veth pair among them: about 20 ms here), and caches what it learned in
//! `/run/criu.kdat` only where /run is a tmpfs. On a host where it is not, a supervisor starts
//! `criu swrk` while its service runs and has it probe the kernel then (a kept-open feature check;
//! CRIU patch 0004 keeps the answers for the request that follows on the same process), with the
//! page-server socket pair of the dump already in place. A stop or checkpoint takes it, and the
//! freeze begins without CRIU's start-up: the one step raw CRIU cannot do before it is asked.
//!
//! At most one per supervisor process (a supervisor dumps one service, one dump at a time), held
//! here until taken or discarded, and as many on the host as dumps may run at once (the caller
//! holds a place for it); an idle one blocks in a read and never wakes. With none ready
//! (the host config's `warm_criu: off`, a warm-up that failed or is slow), a dump starts its own
//! criu as before. An abandoned one is killed with its process group (rpc::Swrk's drop).

use super::rpc::{RpcError, Swrk};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a warm-up may take before it is given up on (a criu that hangs probing the kernel).
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);
/// How long a dump waits for a warm-up still under way: longer and starting a criu of its own
/// is no slower.
const WAIT_FOR_WARM_UP: Duration = Duration::from_millis(200);

/// A criu that has probed the kernel and waits for its request.
pub struct Warm {
    pub swrk: Swrk,
    /// Our end of the page-server socket pair.
    pub pages: UnixStream,
    /// The number criu's end has in criu (the request's `ps.fd`).
    pub pages_fd: RawFd,
}

struct Parked {
    criu: PathBuf,
    ready: mpsc::Receiver<Result<Warm, RpcError>>,
    /// The caller's host-wide place for a warm criu, given back when this one is taken or ends.
    _place: Box<dyn Send>,
}

static PARKED: Mutex<Option<Parked>> = Mutex::new(None);

/// Whether this host gains from a warm CRIU: CRIU keeps its probes of the kernel only on a tmpfs
/// /run; where it can, a criu of its own starts nearly as fast and costs no idle process.
pub fn worth_it() -> bool {
    match nix::sys::statfs::statfs("/run") {
        Ok(fs) => fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC,
        Err(_) => true,
    }
}

/// Whether a criu at `criu` is parked (warm or warming).
pub fn parked(criu: &Path) -> bool {
    PARKED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|p| p.criu == criu)
}

/// Starts warming a criu at `criu` in the background, unless one is parked already; `place` is
/// held as long as it is parked.
pub fn prepare(criu: &Path, place: Box<dyn Send>) {
    let mut parked = PARKED.lock().unwrap_or_else(|e| e.into_inner());
    if parked.as_ref().is_some_and(|p| p.criu == criu) {
        return;
    }
    let (tx, ready) = mpsc::channel();
    let path = criu.to_path_buf();
    std::thread::spawn(move || {
        let warm = warm_up(&path);
        if let Err(e) = &warm {
            tracing::debug!("standby: criu did not warm up: {e}");
        }
        // Nobody waits any more (discarded or replaced): the criu is dropped, so killed.
        let _ = tx.send(warm);
    });
    *parked = Some(Parked { criu: criu.to_path_buf(), ready, _place: place });
}

/// The warm criu for `criu`, if one is ready (or becomes so shortly); the caller's from now on.
pub fn take(criu: &Path) -> Option<Warm> {
    let parked = PARKED.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    if parked.criu != criu {
        return None;
    }
    let mut warm = parked.ready.recv_timeout(WAIT_FOR_WARM_UP).ok()?.ok()?;
    if !warm.swrk.alive() {
        return None;
    }
    // The dump runs at the supervisor's own priority.
    renice(warm.swrk.pid(), 0);
    Some(warm)
}

/// Ends a parked criu (the supervisor is leaving).
pub fn discard() {
    if let Some(parked) = PARKED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // A warm-up under way ends on its own: its criu is dropped when the send finds no one.
        if let Ok(Ok(warm)) = parked.ready.try_recv() {
            drop(warm);
        }
    }
}

/// The niceness a criu warms up at; taken, it runs at the supervisor's.
const WARM_UP_NICE: i32 = 10;

fn renice(pid: i32, nice: i32) {
    // SAFETY: setpriority on our own unreaped child, which no other process can hold the pid of.
    // Best effort: a criu left at a lower priority is only slower.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
}

fn warm_up(criu: &Path) -> Result<Warm, RpcError> {
    let (pages, theirs) =
        super::requests::page_server_pair().map_err(|e| RpcError::Spawn { path: criu.to_path_buf(), source: e })?;
    let pages_fd = theirs.as_raw_fd();
    let mut swrk = Swrk::spawn(criu, &[theirs.as_fd()], true, Instant::now() + WARM_UP_LIMIT)?;
    drop::<OwnedFd>(theirs);
    // The warm-up often follows a start, while the service warms up too: it yields to it.
    renice(swrk.pid(), WARM_UP_NICE);
    let started = Instant::now();
    swrk.warm_up()?;
    tracing::debug!("standby: criu {} warm after {:?}", swrk.pid(), started.elapsed());
    Ok(Warm { swrk, pages, pages_fd })
}
