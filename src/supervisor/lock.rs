//! One supervisor per service: an flock on `<run-dir>/NAME.lock`, held for the supervisor's
//! life and released by the kernel when it dies (no stale pid files). The file holds the
//! supervisor's pid for humans and `status`.

use crate::engine::slots::open_lock_file;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

pub struct ServiceLock {
    _lock: Flock<File>,
}

pub enum Acquired {
    Yes(ServiceLock),
    HeldBy(String),
}

pub fn acquire(path: &Path) -> std::io::Result<Acquired> {
    if let Some(dir) = path.parent() {
        // Root only: nobody else may hold a service's lock (and block its start) or reach its
        // control socket, which lives in the same directory.
        crate::store::durable::create_dir_with_mode(dir, 0o700).map_err(std::io::Error::other)?;
    }
    let file = open_lock_file(path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)?;
            lock.rewind()?;
            writeln!(*lock, "{}", std::process::id())?;
            Ok(Acquired::Yes(ServiceLock { _lock: lock }))
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => Ok(Acquired::HeldBy(read_pid(&mut file))),
        Err((_, e)) => Err(std::io::Error::from(e)),
    }
}

/// The pid of the supervisor holding the lock, or None when no supervisor runs.
pub fn holder(path: &Path) -> Option<String> {
    let file = File::open(path).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_) => None,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => Some(read_pid(&mut file)),
        Err(_) => None,
    }
}

/// Waits until nobody holds the lock (its supervisor has exited), for at most `limit`: a
/// blocking shared flock in a helper thread, so the wait is an event, not a poll.
pub fn wait_released(path: &Path, limit: std::time::Duration) -> bool {
    let Ok(file) = File::open(path) else { return true };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(Flock::lock(file, FlockArg::LockShared).is_ok());
    });
    rx.recv_timeout(limit).unwrap_or(false)
}

fn read_pid(file: &mut File) -> String {
    let mut s = String::new();
    let _ = file.read_to_string(&mut s);
    let s = s.trim().to_string();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}
