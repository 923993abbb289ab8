//! Host-wide slots for dumps and restores, shared by every supervisor: at most N of each run at
//! once (`max_concurrent_dumps`, `max_concurrent_restores` in the host config).
//!
//! A slot is an `flock` on `RUN_DIR/slots/KIND-I.lock`, so the kernel frees it when its holder
//! dies, whatever the way. Waiters take a ticket first (a locked file in `KIND-queue/`, named in
//! arrival order) so they can tell how many are ahead of them; then they block in `flock` on the
//! slot their place in the queue points at: no polling.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Dump,
    Restore,
}

impl SlotKind {
    fn name(self) -> &'static str {
        match self {
            SlotKind::Dump => "dump",
            SlotKind::Restore => "restore",
        }
    }
}

/// A held slot; dropping it frees the slot and the ticket.
pub struct Slot {
    _lock: Flock<File>,
    _ticket: Ticket,
}

struct Ticket {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock(file: File, arg: FlockArg) -> Result<Flock<File>, nix::errno::Errno> {
    Flock::lock(file, arg).map_err(|(_, e)| e)
}

/// Takes a slot of `kind` among `capacity`, waiting if all are taken. `on_wait(ahead)` is
/// called once, before blocking, with the number of holders and waiters that came first.
pub fn acquire(dir: &Path, kind: SlotKind, capacity: usize, on_wait: impl FnOnce(usize)) -> std::io::Result<Slot> {
    let capacity = capacity.max(1);
    let queue = dir.join(format!("{}-queue", kind.name()));
    crate::store::durable::create_dir_with_mode(&queue, 0o700).map_err(std::io::Error::other)?;
    let ticket = take_ticket(&queue)?;
    let slot_path = |i: usize| dir.join(format!("{}-{i}.lock", kind.name()));
    for i in 0..capacity {
        match lock(open_lock_file(&slot_path(i))?, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(Slot { _lock: l, _ticket: ticket }),
            Err(nix::errno::Errno::EWOULDBLOCK) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let ahead = live_tickets_before(&queue, &ticket.path);
    on_wait(ahead);
    // Spreading the waiters over the slots by their place in the queue keeps each slot's line short.
    let l = lock(open_lock_file(&slot_path(ahead % capacity))?, FlockArg::LockExclusive)?;
    Ok(Slot { _lock: l, _ticket: ticket })
}

/// A lock file of root's (0600 whatever the umask), never through a symlink planted in its place.
pub(crate) fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(file)
}

/// A ticket file, locked before it gets its final name so nobody can mistake it for a dead one.
/// One of `capacity` slots named `name`, only if one is free at once (no queue, no wait): for
/// what is worth having but never worth waiting for (a warm criu, criu::standby).
pub fn try_acquire(dir: &Path, name: &str, capacity: usize) -> Option<Flock<File>> {
    crate::store::durable::create_dir_with_mode(dir, 0o700).ok()?;
    (0..capacity.max(1)).find_map(|i| {
        lock(open_lock_file(&dir.join(format!("{name}-{i}.lock"))).ok()?, FlockArg::LockExclusiveNonblock).ok()
    })
}

fn take_ticket(queue: &Path) -> std::io::Result<Ticket> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("{nanos:024}-{}", std::process::id());
    let tmp = queue.join(format!(".{name}"));
    let l = lock(open_lock_file(&tmp)?, FlockArg::LockExclusiveNonblock)?;
    let path = queue.join(&name);
    std::fs::rename(&tmp, &path)?;
    Ok(Ticket { path, _lock: l })
}

/// Tickets older than `mine` whose holders are alive; dead ones (lock free) are removed.
fn live_tickets_before(queue: &Path, mine: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(queue) else { return 0 };
    let my_name = mine.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    let mut n = 0;
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') || name >= my_name {
            continue;
        }
        let Ok(f) = File::open(e.path()) else { continue };
        match Flock::lock(f, FlockArg::LockSharedNonblock) {
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => n += 1,
            Ok(_) => {
                let _ = std::fs::remove_file(e.path());
            }
            Err(_) => {}
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_limited_and_freed_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let a = acquire(d.path(), SlotKind::Dump, 2, |_| panic!("a free slot needs no wait")).unwrap();
        let _b = acquire(d.path(), SlotKind::Dump, 2, |_| panic!("a free slot needs no wait")).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let _c = acquire(&dir, SlotKind::Dump, 2, |ahead| tx.send(ahead).unwrap()).unwrap();
        });
        assert_eq!(rx.recv().unwrap(), 2, "both holders are ahead");
        drop(a);
        waiter.join().unwrap();
        let _r = acquire(d.path(), SlotKind::Restore, 1, |_| panic!("restores have their own slots")).unwrap();
    }
}
