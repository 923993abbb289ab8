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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a warm-up may take before it is given up on (a criu that hangs probing the kernel).
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);
/// How long a dump waits for a warm-up still under way: longer and starting a criu of its own
/// is no slower.
const WAIT_FOR_WARM_UP: Duration = Duration::from_millis(200);

/// What a warm criu is for: its request names descriptors that must be in place at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The service's next dump: criu holds its end of the page-server pair.
    Dump,
    /// The restore the supervisor is about to run: criu holds the write end of the service's new
    /// stdout pipe.
    Restore,
}

/// The descriptors of a warm criu's request, on our side.
pub enum Ends {
    /// Our end of the page-server pair, and the number criu's end has in criu.
    Dump { pages: UnixStream, pages_fd: RawFd },
    /// The read end of the service's new stdout pipe, and our copy of its write end: criu holds
    /// the write end under the number ours has.
    Restore { output: OwnedFd, stdout: OwnedFd },
}

/// A criu that has probed the kernel and waits for its request.
pub struct Warm {
    pub swrk: Swrk,
    pub ends: Ends,
}

struct Parked {
    criu: PathBuf,
    purpose: Purpose,
    ready: mpsc::Receiver<Result<Warm, RpcError>>,
    /// The criu being warmed, once started (0 before): what giving up on it kills.
    pid: Arc<AtomicI32>,
    /// The caller's host-wide place for a warm criu, given back when this one is taken or ends.
    _place: Box<dyn Send>,
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Not taken: a criu still warming up is ended now, not at its warm-up deadline (one
        // that is warm already ends with its Swrk when the thread finds no one to give it to).
        let pid = self.pid.load(Ordering::SeqCst);
        if pid > 0 && self.ready.try_recv().is_err() {
            // SAFETY: criu is the warm-up thread's unreaped child (its Swrk reaps it), so the
            // group id is still its own.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

static PARKED: Mutex<Option<Parked>> = Mutex::new(None);

/// Whether this host gains from a warm CRIU: CRIU keeps its probes of the kernel only on a tmpfs
/// /run; where it can, a criu of its own starts nearly as fast and costs no idle process.
fn worth_it() -> bool {
    match nix::sys::statfs::statfs("/run") {
        Ok(fs) => fs.filesystem_type() != nix::sys::statfs::TMPFS_MAGIC,
        Err(_) => true,
    }
}

/// Whether the host's `warm_criu` setting asks for warm criu processes here.
pub fn wanted(setting: crate::config::host::WarmCriu) -> bool {
    use crate::config::host::WarmCriu;
    match setting {
        WarmCriu::On => true,
        WarmCriu::Off => false,
        WarmCriu::Auto => worth_it(),
    }
}

/// Whether a criu at `criu` is parked (warm or warming) for `purpose`.
pub fn parked(criu: &Path, purpose: Purpose) -> bool {
    PARKED.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|p| p.criu == criu && p.purpose == purpose)
}

/// Starts warming a criu at `criu` for `purpose` in the background, unless one is parked for it
/// already (one parked for the other purpose is ended); `place` is held as long as it is parked.
pub fn prepare(criu: &Path, purpose: Purpose, place: Box<dyn Send>) {
    let mut parked = PARKED.lock().unwrap_or_else(|e| e.into_inner());
    if parked.as_ref().is_some_and(|p| p.criu == criu && p.purpose == purpose) {
        return;
    }
    let (tx, ready) = mpsc::channel();
    let pid = Arc::new(AtomicI32::new(0));
    let (path, started) = (criu.to_path_buf(), pid.clone());
    std::thread::spawn(move || {
        let warm = warm_up(&path, purpose, &started);
        if let Err(e) = &warm {
            tracing::debug!("standby: criu did not warm up: {e}");
        }
        // Nobody waits any more (discarded or replaced): the criu is dropped, so killed.
        let _ = tx.send(warm);
    });
    *parked = Some(Parked { criu: criu.to_path_buf(), purpose, ready, pid, _place: place });
}

/// The warm criu at `criu` for `purpose`, if one is ready (or becomes so shortly); the caller's
/// from now on. One parked for something else, or too slow, is ended.
pub fn take(criu: &Path, purpose: Purpose) -> Option<Warm> {
    let parked = PARKED.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    if parked.criu != criu || parked.purpose != purpose {
        return None;
    }
    let warm = parked.ready.recv_timeout(WAIT_FOR_WARM_UP);
    // Ours now, whatever it is: not the parked one's to kill.
    parked.pid.store(0, Ordering::SeqCst);
    let mut warm = warm.ok()?.ok()?;
    if !warm.swrk.alive() {
        return None;
    }
    // The request runs at the supervisor's own priority.
    renice(warm.swrk.pid(), 0);
    Some(warm)
}

/// Ends a parked criu (the run is over, or the supervisor is leaving).
pub fn discard() {
    drop(PARKED.lock().unwrap_or_else(|e| e.into_inner()).take());
}

/// The niceness a criu warms up at; taken, it runs at the supervisor's.
const WARM_UP_NICE: i32 = 10;

fn renice(pid: i32, nice: i32) {
    // SAFETY: setpriority on our own unreaped child, which no other process can hold the pid of.
    // Best effort: a criu left at a lower priority is only slower.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
}

fn warm_up(criu: &Path, purpose: Purpose, started: &AtomicI32) -> Result<Warm, RpcError> {
    let spawn = |source| RpcError::Spawn { path: criu.to_path_buf(), source };
    let spawn_with = |fd: BorrowedFd<'_>| Swrk::spawn(criu, &[fd], true, Instant::now() + WARM_UP_LIMIT);
    let (mut swrk, ends) = match purpose {
        Purpose::Dump => {
            let (pages, theirs) = super::page_server::socket_pair().map_err(spawn)?;
            let swrk = spawn_with(theirs.as_fd())?;
            // criu's end is criu's alone (dropped here): its end of the stream shows criu is gone.
            (swrk, Ends::Dump { pages, pages_fd: theirs.as_raw_fd() })
        }
        Purpose::Restore => {
            let (output, stdout) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| spawn(std::io::Error::from(e)))?;
            // The write end stays open here too, under the number criu has it by.
            let swrk = spawn_with(stdout.as_fd())?;
            (swrk, Ends::Restore { output, stdout })
        }
    };
    started.store(swrk.pid(), Ordering::SeqCst);
    if purpose == Purpose::Dump {
        // The warm-up often follows a start, while the service warms up too: it yields to it.
        renice(swrk.pid(), WARM_UP_NICE);
    }
    let began = Instant::now();
    swrk.warm_up()?;
    tracing::debug!("standby: criu {} warm for {purpose:?} after {:?}", swrk.pid(), began.elapsed());
    Ok(Warm { swrk, ends })
}
