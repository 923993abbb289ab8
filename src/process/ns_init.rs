//! The init of a service's PID namespace: `stasis __ns-init ...`, run as root from the
//! content-addressed copy. It starts the command as the service user, reaps orphans, forwards
//! TERM/INT/HUP/QUIT/USR1/USR2 to every process of the namespace, and keeps the namespace alive
//! until its last process is gone, so daemons that fork into the background keep working.
//! It is part of every checkpoint, so it stays small and starts no runtime. It is built as its
//! own tiny binary (`stasis-init`, src/bin/stasis-init.rs, which includes this file alone), and
//! is also reachable as `stasis __ns-init` for hosts that only have the main binary.

use nix::sys::signal::{kill, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

pub const ARGV_MARKER: &str = "__ns-init";
/// Where the supervisor listens for "ok" / "error ..." about the start of the command.
pub const READY_FD: i32 = 3;
/// A memfd with the service's environment (`KEY=VALUE\0...`): it reaches only the service, after
/// the privilege drop, never this root process's own environment (nor its argv, which anyone
/// can read in /proc).
pub const ENV_FD: i32 = 4;
/// The environment the init itself runs with.
pub const INIT_ENV: &[&str] = &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"];
const FORWARDED: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

struct Args {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    workdir: CString,
    command: Vec<CString>,
}

fn decode_args(args: &[OsString]) -> Option<Args> {
    let s = |i: usize| args.get(i).and_then(|a| a.to_str());
    let groups = s(2)?;
    Some(Args {
        uid: s(0)?.parse().ok()?,
        gid: s(1)?.parse().ok()?,
        groups: if groups.is_empty() {
            Vec::new()
        } else {
            groups.split(',').map(|g| g.parse().ok()).collect::<Option<_>>()?
        },
        workdir: CString::new(args.get(3)?.as_bytes()).ok()?,
        command: args.get(4..)?.iter().map(|a| CString::new(a.as_bytes()).ok()).collect::<Option<Vec<_>>>()?,
    })
    .filter(|a| !a.command.is_empty())
}

extern "C" fn on_signal(_: libc::c_int) {}

pub fn main(raw: &[OsString]) -> ! {
    // Forwarding a signal is kill(-1): harmless as the init of a fresh PID namespace, a disaster
    // anywhere else. So it runs only as PID 1, and only with the supervisor's pipe and memfd.
    if nix::unistd::getpid().as_raw() != 1 || !is_fifo(READY_FD) {
        eprintln!("stasis-init: refusing to run: this is the init of a service's PID namespace, started by the stasis supervisor, not by hand");
        std::process::exit(2);
    }
    let Some(args) = decode_args(raw) else {
        eprintln!("stasis-init: bad arguments; this is started by the stasis supervisor, not by hand");
        std::process::exit(2);
    };
    let env = read_environment();
    let _ = nix::unistd::setsid();
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    // PID 1 drops signals that have no handler; a no-op handler plus a blocked mask lets
    // sigwait() receive them instead.
    let handler = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in FORWARDED.iter().chain([Signal::SIGCHLD].iter()) {
        waited.add(*sig);
        // SAFETY: the handler does nothing.
        let _ = unsafe { sigaction(*sig, &handler) };
    }
    let _ = waited.thread_block();

    let (err_r, err_w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => report_and_exit(&format!("error failed to create a pipe: {e}\n"), 1),
    };
    // SAFETY: single-threaded process.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => exec_service(&args, &env, err_w),
        Ok(ForkResult::Parent { child }) => {
            drop(err_w);
            let mut msg = String::new();
            let _ = std::io::Read::read_to_string(&mut std::fs::File::from(err_r), &mut msg);
            let line = if msg.is_empty() { "ok\n".to_string() } else { format!("error {msg}\n") };
            write_ready(&line);
            reap_until_empty(&waited, child)
        }
        Err(e) => report_and_exit(&format!("error failed to fork: {e}\n"), 1),
    }
}

fn write_ready(line: &str) {
    // SAFETY: READY_FD is the pipe the supervisor handed us; closing it keeps it out of checkpoints.
    unsafe {
        libc::write(READY_FD, line.as_ptr().cast(), line.len());
        libc::close(READY_FD);
    }
}

fn report_and_exit(line: &str, code: i32) -> ! {
    write_ready(line);
    std::process::exit(code)
}

fn is_fifo(fd: i32) -> bool {
    // SAFETY: only inspected, never closed; fstat fails cleanly on a closed fd.
    nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
        .is_ok_and(|s| s.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// The service's environment from ENV_FD, which is closed afterwards (it must not end up in
/// the checkpoint).
fn read_environment() -> Vec<CString> {
    // SAFETY: ENV_FD was put in place by the supervisor for this process alone.
    let file = std::fs::File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ENV_FD) });
    let mut bytes = Vec::new();
    let _ = std::io::Read::read_to_end(&mut &file, &mut bytes);
    drop(file);
    bytes.split(|b| *b == 0).filter(|e| !e.is_empty()).filter_map(|e| CString::new(e).ok()).collect()
}

/// `program` as execvp would find it, but in the service's PATH rather than the init's.
fn resolve(program: &CString, env: &[CString]) -> CString {
    let bytes = program.as_bytes();
    if bytes.contains(&b'/') {
        return program.clone();
    }
    let path = env
        .iter()
        .find_map(|e| e.as_bytes().strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(|b| *b == b':').filter(|d| !d.is_empty()) {
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(bytes);
        if let Ok(c) = CString::new(full) {
            if nix::unistd::access(c.as_c_str(), nix::unistd::AccessFlags::X_OK).is_ok() {
                return c;
            }
        }
    }
    program.clone()
}

fn exec_service(args: &Args, env: &[CString], err_w: OwnedFd) -> ! {
    let fail = |what: String| -> ! {
        let _ = nix::unistd::write(&err_w, what.as_bytes());
        // SAFETY: leaving the forked child without running the parent's destructors.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: restoring default dispositions in the single-threaded child before exec.
    unsafe {
        libc::close(READY_FD);
        for sig in FORWARDED.iter().chain([Signal::SIGCHLD, Signal::SIGPIPE].iter()) {
            let _ = sigaction(*sig, &SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty()));
        }
    }
    let _ = SigSet::empty().thread_set_mask();
    let groups: Vec<nix::unistd::Gid> = args.groups.iter().map(|g| nix::unistd::Gid::from_raw(*g)).collect();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        fail(format!("failed to set supplementary groups {:?}: {e}", args.groups));
    }
    if let Err(e) = nix::unistd::setgid(nix::unistd::Gid::from_raw(args.gid)) {
        fail(format!("failed to set gid {}: {e}", args.gid));
    }
    if let Err(e) = nix::unistd::setuid(nix::unistd::Uid::from_raw(args.uid)) {
        fail(format!("failed to set uid {}: {e}", args.uid));
    }
    if let Err(e) = nix::unistd::chdir(args.workdir.as_c_str()) {
        fail(format!("failed to enter working directory {}: {e}", args.workdir.to_string_lossy()));
    }
    let program = resolve(&args.command[0], env);
    let e = nix::unistd::execve(&program, &args.command, env).unwrap_err();
    let _ = err_w.as_raw_fd();
    fail(format!("failed to execute {}: {e}", program.to_string_lossy()))
}

/// How long the rest of the namespace gets between SIGTERM and the init's exit after the command
/// failed; whatever is left then is SIGKILLed by the kernel when the init exits.
const CRASH_GRACE_SECS: libc::time_t = 3;

/// The command's wait status as the init's own exit code: its exit code, or 128 + N for
/// signal N (PID 1 of a namespace cannot die of a signal it raises itself, so a shell's
/// convention carries it; the supervisor decodes it, `supervisor::restart::Exit::from_init_code`).
fn encode(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Reaps every child (the command and any orphan) and forwards signals, until no process is
/// left in the namespace; then exits with the service's status (docs/how-it-works.md):
/// - the command failed (an exit code not 0, or a signal): the service has crashed, whatever
///   its children do. The rest of the namespace gets SIGTERM and `CRASH_GRACE_SECS` to end;
///   the init then exits with the command's status (the kernel kills what is left). Not after
///   a TERM, INT or QUIT the init forwarded: that is a stop, and its deadline is the
///   supervisor's (`stop_timeout_secs`);
/// - the command exited 0 and processes live on (a daemon that went to the background): the
///   service lives on in them. The processes reaped here from then on are the ones whose parent
///   is gone (the daemon itself, not the workers it reaps): the first of them to fail is the
///   service's status when the last process is gone, else 0. Orphans that end while the
///   command still runs are the command's business.
fn reap_until_empty(waited: &SigSet, command: Pid) -> ! {
    let mut command_done = false;
    let mut failure: Option<i32> = None;
    // Set when the command failed: by then the rest of the namespace must be gone.
    let mut teardown: Option<libc::timespec> = None;
    let mut stopping = false;
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    let Some(code) = encode(status) else { continue };
                    if status.pid() == Some(command) {
                        command_done = true;
                        if code != 0 {
                            failure = Some(code);
                        }
                        if code != 0 && !stopping {
                            let now = monotonic();
                            teardown = Some(libc::timespec { tv_sec: now.tv_sec + CRASH_GRACE_SECS, ..now });
                            let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
                        }
                    } else if command_done && code != 0 && failure.is_none() {
                        failure = Some(code);
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ECHILD) => std::process::exit(failure.unwrap_or(0)),
                Err(_) => break,
            }
        }
        let sig = match teardown {
            None => waited.wait().ok(),
            Some(deadline) => match wait_until(waited, deadline) {
                Err(()) => std::process::exit(failure.unwrap_or(0)),
                Ok(sig) => sig,
            },
        };
        match sig {
            Some(Signal::SIGCHLD) | None => {}
            // -1 from a namespace's init: every process of the namespace but the init itself.
            Some(sig) => {
                stopping |= matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT);
                let _ = kill(Pid::from_raw(-1), sig);
            }
        }
    }
}

/// One of `waited`, or Err once `deadline` (CLOCK_MONOTONIC) has passed.
fn wait_until(waited: &SigSet, deadline: libc::timespec) -> Result<Option<Signal>, ()> {
    let now = monotonic();
    let left_ns = (deadline.tv_sec - now.tv_sec) * 1_000_000_000 + (deadline.tv_nsec - now.tv_nsec);
    if left_ns <= 0 {
        return Err(());
    }
    let timeout = libc::timespec { tv_sec: left_ns / 1_000_000_000, tv_nsec: left_ns % 1_000_000_000 };
    // SAFETY: valid set and timeout; no siginfo wanted.
    let n = unsafe { libc::sigtimedwait(waited.as_ref(), std::ptr::null_mut(), &timeout) };
    Ok(if n > 0 { Signal::try_from(n).ok() } else { None })
}

fn monotonic() -> libc::timespec {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t
}
