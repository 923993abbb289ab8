//! The guard of a lazy restore: a small process of its own that holds a copy of every
//! userfaultfd the supervisor holds (criu::lazy), so that the supervisor killed in the middle of
//! a transfer never leaves the tree to read zeros. Without it, the supervisor's copies die with
//! it, the lazy-pages daemon ends when our end of its page-server socket closes, the kernel
//! unregisters the ranges, and every page not yet copied reads as zeros.
//!
//! The guard is forked from the supervisor before the tree resumes. It waits on its end of a
//! socket pair: the word [`RELEASE`] (the transfer is over, or the supervisor ended the tree
//! itself) lets it go; a userfaultfd passed over it (a process of the tree forked) is kept too;
//! the socket closing without that word means the supervisor is gone, and it kills the tree's
//! root (the init of the tree's PID namespace, so every process of it) through a pidfd taken
//! while the root was certainly the supervisor's child, waits for it to be gone, and only then
//! exits, letting its references go. Faults wait meanwhile; none is answered with zeros.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The supervisor's word that the guard may let its references go.
const RELEASE: u8 = b'r';
/// The supervisor's word that comes with a userfaultfd to keep.
const KEEP: u8 = b'k';
/// How long the guard waits for the killed tree to be gone before it lets go anyway.
const KILL_WAIT_MS: i32 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("failed to open a pidfd for the restored tree's root {0}")]
    Pidfd(i32),
    #[error("failed to make the guard's socket pair: {0}")]
    Socket(nix::Error),
    #[error("failed to fork the guard: {0}")]
    Fork(std::io::Error),
}

/// The supervisor's end of a running guard.
pub struct Guard {
    pid: libc::pid_t,
    word: OwnedFd,
}

impl Guard {
    /// Forks the guard of the tree under `root` (a child of this process), holding `held`.
    pub fn start(root: i32, held: &[OwnedFd]) -> Result<Guard, GuardError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let root_fd = crate::process::tree::pidfd(root).ok_or(GuardError::Pidfd(root))?;
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(GuardError::Socket)?;
        let mut keep: Vec<RawFd> = held.iter().map(|f| f.as_raw_fd()).collect();
        keep.extend([theirs.as_raw_fd(), root_fd.as_raw_fd()]);
        keep.sort_unstable();
        // SAFETY: the child only makes system calls (no allocation, no lock) and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(GuardError::Fork(std::io::Error::last_os_error())),
            0 => unsafe { guard(&keep, theirs.as_raw_fd(), root_fd.as_raw_fd()) },
            pid => {
                tracing::debug!("lazy restore: guard {pid} holds {} userfaultfds of the tree of {root}", held.len());
                Ok(Guard { pid, word: ours })
            }
        }
    }

    /// Hands the guard a copy of a userfaultfd taken after it started (a fork in the tree).
    pub fn keep(&self, uffd: &OwnedFd) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let fds = [uffd.as_raw_fd()];
        let word = [std::io::IoSlice::new(&[KEEP])];
        let sent =
            sendmsg::<()>(self.word.as_raw_fd(), &word, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None);
        if let Err(e) = sent {
            tracing::warn!("lazy restore: failed to hand the guard a new userfaultfd: {e}");
        }
    }

    /// The pid of the guard (tests and the log).
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for Guard {
    /// Lets the guard go: the transfer is over, or the tree was ended by the supervisor.
    fn drop(&mut self) {
        let _ = nix::unistd::write(&self.word, &[RELEASE]);
        // It exits at once on the word; bounded all the same, and never a pid not ours.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut status = 0;
            // SAFETY: our own child's pid, no memory but the status word.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r != 0 || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The guard itself, in the forked child: system calls only.
///
/// # Safety
/// Only in the child of `fork`, with `keep` sorted and holding `word` and `root`.
unsafe fn guard(keep: &[RawFd], word: RawFd, root: RawFd) -> ! {
    // Its own group: a ^C or a signal to the supervisor's group does not let the pages go.
    libc::setpgid(0, 0);
    for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE] {
        libc::signal(s, libc::SIG_IGN);
    }
    let mut low: u32 = 0;
    for &fd in keep {
        if fd as u32 > low {
            libc::syscall(libc::SYS_close_range, low, fd as u32 - 1, 0);
        }
        low = fd as u32 + 1;
    }
    libc::syscall(libc::SYS_close_range, low, u32::MAX, 0);
    loop {
        let mut byte = 0u8;
        let mut iov = libc::iovec { iov_base: (&mut byte as *mut u8).cast(), iov_len: 1 };
        // Room for one descriptor's control message.
        let mut control = [0u64; 4];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let got = libc::recvmsg(word, &mut msg, libc::MSG_CMSG_CLOEXEC);
        if got < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        match (got, byte) {
            (1, RELEASE) => libc::_exit(0),
            // A passed userfaultfd is now one of ours: kept by not closing it.
            (1, KEEP) => continue,
            _ => break,
        }
    }
    // The supervisor is gone: end the tree while every fault still waits on our references.
    libc::syscall(libc::SYS_pidfd_send_signal, root, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0);
    let mut p = libc::pollfd { fd: root, events: libc::POLLIN, revents: 0 };
    libc::poll(&mut p, 1, KILL_WAIT_MS);
    libc::_exit(1)
}
