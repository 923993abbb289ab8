//! CRIU over RPC: one `criu swrk` per request, on a socket pair of our own (SOCK_SEQPACKET: one
//! message is one protobuf). CRIU sends each notification (`pre-dump`, `post-dump`,
//! `network-lock`, `pre-resume`, ...) as a message and waits for the answer, so what used to
//! run as action scripts (a second and third process, talking back through the environment and
//! marker files) runs in the caller, and its verdict is a value. Every wait has the request's
//! deadline: past it, criu (our child) is killed and the request has failed.

/// The RPC messages (proto/criu/rpc.proto).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/rpc/_.rs"));
}

use prost::Message;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for the rest of the log once criu has exited.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// The largest message CRIU sends (a response with an error text, a notification): far below.
const MAX_MESSAGE: usize = 64 * 1024;

/// What a notification is answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Go on.
    Proceed,
    /// Stop the request: CRIU undoes what it can (a dump resumes the tree) and fails it.
    Refuse(String),
}

/// A notification CRIU sends while it works, and waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// CRIU's name for the moment: `pre-dump`, `post-dump`, `network-lock`, `network-unlock`,
    /// `setup-namespaces`, `post-setup-namespaces`, `pre-resume`, `post-resume`, `post-restore`, ...
    pub script: String,
    /// The root of the tree being restored, where CRIU says it (post-restore, pre-resume).
    pub pid: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("failed to create the socket pair for criu swrk: {0}")]
    Socket(#[source] nix::Error),
    #[error("failed to start {path} swrk: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("failed to send criu a request: {0}")]
    Send(#[source] std::io::Error),
    #[error("failed to read criu's answer: {0}")]
    Receive(#[source] std::io::Error),
    #[error("failed to read criu's answer: {0} (not a criu_resp message)")]
    Decode(#[from] prost::DecodeError),
    #[error("failed to get an answer: criu ended the conversation ({status})")]
    Ended { status: String },
    #[error("failed to finish within {after:?}: criu was killed")]
    TimedOut { after: Duration },
    #[error("failed: {refused} (refused at CRIU's {script} notification)")]
    Refused { script: String, refused: String },
    #[error("failed: criu answered a {asked:?} request with a {got:?} response")]
    Mismatch { asked: pb::CriuReqType, got: i32 },
}

/// How a request ended, when CRIU answered it.
#[derive(Debug)]
pub struct Reply {
    pub resp: pb::CriuResp,
    /// Notifications seen, in order (for the timeline and tests).
    pub notified: Vec<String>,
}

impl Reply {
    /// CRIU's own error text and errno, for a request it failed.
    #[cfg(test)]
    pub fn failure(&self) -> Option<String> {
        (!self.resp.success).then(|| {
            let msg = self.resp.cr_errmsg.clone().unwrap_or_default();
            match self.resp.cr_errno {
                Some(e) if e != 0 => format!("{msg} ({})", std::io::Error::from_raw_os_error(e)),
                _ => msg,
            }
        })
    }
}

/// One `criu swrk` process and our end of its socket.
pub struct Swrk {
    child: Child,
    sock: OwnedFd,
    deadline: Instant,
    started: Instant,
    /// CRIU's log (`log_to_stderr`), copied into a file within caps, when asked for.
    log: Option<super::log_capture::Capture>,
}

impl Swrk {
    /// Starts `criu swrk` under `deadline`. `inherit` are descriptors criu must hold under their
    /// own numbers (`inherit_fd` of a restore); they stay open across its exec only. With `log`,
    /// criu's stderr (where a request with `log_to_stderr` sends its log) is copied there.
    pub fn start(
        criu: &Path,
        inherit: &[BorrowedFd<'_>],
        log: Option<&Path>,
        deadline: Instant,
    ) -> Result<Swrk, RpcError> {
        let mut swrk = Swrk::spawn(criu, inherit, log.is_some(), deadline)?;
        if let Some(path) = log {
            swrk.capture_log(path);
        }
        Ok(swrk)
    }

    /// Starts `criu swrk` with its stderr kept in a pipe (when `piped`) until [`Swrk::capture_log`]
    /// says where it goes: a CRIU started ahead of its request (criu::standby) learns the log's
    /// place only then, and the pipe holds what it wrote meanwhile.
    pub fn spawn(criu: &Path, inherit: &[BorrowedFd<'_>], piped: bool, deadline: Instant) -> Result<Swrk, RpcError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(RpcError::Socket)?;
        let mut cmd = Command::new(criu);
        // No /etc/criu/default.conf, no ~/.criu: what CRIU does is what the request says (and the
        // config file it names, checked against the same allowlist as the service's options).
        cmd.arg("--no-default-config")
            .arg("swrk")
            .arg(theirs.as_raw_fd().to_string())
            // A clean environment, as for every criu run (see run.rs).
            .env_clear()
            .env("PATH", crate::config::DEFAULT_PATH)
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if piped { Stdio::piped() } else { Stdio::null() });
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // The descriptors reach criu by staying open across its exec (no pre_exec hook: that
        // would make std fork the whole supervisor instead of using posix_spawn).
        let fds: Vec<RawFd> =
            std::iter::once(theirs.as_raw_fd()).chain(inherit.iter().map(|f| f.as_raw_fd())).collect();
        let guards = fds.iter().map(|&fd| Inherit::new(fd)).collect::<std::io::Result<Vec<_>>>();
        let guards = guards.map_err(|source| RpcError::Spawn { path: criu.to_path_buf(), source })?;
        let child = cmd.spawn().map_err(|source| RpcError::Spawn { path: criu.to_path_buf(), source });
        drop(guards);
        drop(theirs);
        let child = child?;
        if let Some(stderr) = &child.stderr {
            // Best effort: a smaller pipe only means more wake-ups.
            // SAFETY: F_SETPIPE_SZ on a pipe fd we own.
            unsafe { libc::fcntl(stderr.as_raw_fd(), libc::F_SETPIPE_SZ, super::log_capture::PIPE_SIZE) };
        }
        Ok(Swrk { child, sock: ours, deadline, started: Instant::now(), log: None })
    }

    /// Copies criu's stderr (its log, with `log_to_stderr`) into `path` from now on, with what
    /// the pipe already holds first; a criu started without a pipe has nothing to copy.
    pub fn capture_log(&mut self, path: &Path) {
        if let Some(stderr) = self.child.stderr.take() {
            self.log = Some(super::log_capture::spawn(stderr, path.to_path_buf()));
        }
    }

    /// Gives the conversation a new deadline (and restarts its clock): a criu started ahead of
    /// its request is timed from the request.
    pub fn renew(&mut self, deadline: Instant) {
        self.deadline = deadline;
        self.started = Instant::now();
    }

    /// Has criu probe the kernel now, for the request that will follow on this same process: a
    /// feature check it keeps the conversation open after (CRIU patch 0004 keeps what the probe
    /// learned; without it the probe is only repeated later).
    pub fn warm_up(&mut self) -> Result<(), RpcError> {
        let req = pb::CriuReq {
            r#type: pb::CriuReqType::FeatureCheck as i32,
            keep_open: Some(true),
            // CRIU reads the features asked for unconditionally: the message must be there.
            features: Some(pb::CriuFeatures::default()),
            ..Default::default()
        };
        let reply = self.call(&req, &mut |_| Answer::Proceed)?;
        if reply.resp.success {
            Ok(())
        } else {
            Err(RpcError::Ended { status: "it could not probe the kernel's features".into() })
        }
    }

    /// Whether criu still runs (a parked one may have died).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// criu's pid (progress, and the tree a dump freezes is its tracee).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `req` and answers every notification with `on_notify` until CRIU's final response.
    /// A refusal is sent to CRIU (so it rolls back) and returned as [`RpcError::Refused`].
    pub fn call(
        &mut self,
        req: &pb::CriuReq,
        on_notify: &mut dyn FnMut(&Notification) -> Answer,
    ) -> Result<Reply, RpcError> {
        let asked = req.r#type();
        self.send(req)?;
        let mut notified = Vec::new();
        let mut refused: Option<(String, String)> = None;
        loop {
            let resp = self.receive()?;
            if resp.r#type() != pb::CriuReqType::Notify {
                if resp.r#type() != asked {
                    return Err(RpcError::Mismatch { asked, got: resp.r#type });
                }
                if let Some((script, refused)) = refused {
                    return Err(RpcError::Refused { script, refused });
                }
                return Ok(Reply { resp, notified });
            }
            let n = resp.notify.unwrap_or_default();
            let note = Notification { script: n.script.unwrap_or_default(), pid: n.pid.filter(|p| *p > 0) };
            tracing::debug!("criu rpc: notified {} after {:?}", note.script, self.started.elapsed());
            let answer = on_notify(&note);
            notified.push(note.script.clone());
            let ok = answer == Answer::Proceed;
            if let Answer::Refuse(why) = answer {
                refused.get_or_insert((note.script, why));
            }
            self.send(&pb::CriuReq {
                r#type: pb::CriuReqType::Notify as i32,
                notify_success: Some(ok),
                ..Default::default()
            })?;
        }
    }

    /// Waits for criu to exit (it does after its one request), within the deadline.
    pub fn finish(mut self) -> Result<std::process::ExitStatus, RpcError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if !crate::process::tree::exits_within(self.pid(), left) {
            return Err(self.kill());
        }
        self.child.wait().map_err(RpcError::Receive)
    }

    /// The end of CRIU's log once criu has exited (the last MiB, from memory: a full disk may
    /// have refused the file its end); empty without a log.
    pub fn take_log(&mut self) -> Vec<u8> {
        self.log.take().map(|c| c.finish(LOG_DRAIN)).unwrap_or_default()
    }

    fn send(&mut self, req: &pb::CriuReq) -> Result<(), RpcError> {
        let bytes = req.encode_to_vec();
        // SAFETY: send(2) from a buffer we own, within its length.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n != bytes.len() as isize {
            return Err(RpcError::Send(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<pb::CriuResp, RpcError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if !readable(self.sock.as_fd(), left).map_err(RpcError::Receive)? {
            return Err(self.kill());
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        // SAFETY: recv(2) into a buffer we own, within its length.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_TRUNC) };
        let reset = n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECONNRESET);
        if n < 0 && !reset {
            return Err(RpcError::Receive(std::io::Error::last_os_error()));
        }
        // Gone: an end of file, or a reset when it left our request unread.
        if n == 0 || reset {
            let status = match self.child.wait() {
                Ok(st) => st.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(RpcError::Ended { status });
        }
        let n = n as usize;
        if n > buf.len() {
            return Err(RpcError::Receive(std::io::Error::other(format!(
                "a message of {n} bytes (at most {MAX_MESSAGE})"
            ))));
        }
        Ok(pb::CriuResp::decode(&buf[..n])?)
    }

    /// Ends a criu that ran out of time: its process group (criu is our unreaped child, so the
    /// group id cannot have been reused), then reaps it.
    fn kill(&mut self) -> RpcError {
        let after = self.deadline.saturating_duration_since(self.started);
        // SAFETY: see above.
        unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
        RpcError::TimedOut { after }
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        // A conversation abandoned half-way (an error above): criu must not outlive it.
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: our unreaped child's own group.
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Waits until `fd` is readable (or its peer hung up) for at most `limit`.
fn readable(fd: BorrowedFd<'_>, limit: Duration) -> std::io::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one pollfd we own.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            0 => return Ok(false),
            n if n > 0 => return Ok(true),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Clears FD_CLOEXEC on a descriptor until dropped: a program started meanwhile inherits it.
pub(super) struct Inherit(RawFd);

impl Inherit {
    pub(super) fn new(fd: RawFd) -> std::io::Result<Inherit> {
        // SAFETY: fcntl on a descriptor the caller holds for the guard's lifetime.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Inherit(fd))
    }
}

impl Drop for Inherit {
    fn drop(&mut self) {
        // SAFETY: as above; the descriptor is still held by the caller.
        unsafe { libc::fcntl(self.0, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One at a time: while one test spawns criu with a descriptor made inheritable, a fork in
    /// another (the process to dump) would take it along and hold a socket CRIU cannot dump.
    static SPAWNS: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn criu() -> PathBuf {
        which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin"), "/")
            .expect("CRIU is installed (scripts/setup)")
    }

    #[test]
    fn criu_answers_a_version_request_over_rpc() {
        let _one = SPAWNS.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = Swrk::start(&criu(), &[], None, Instant::now() + Duration::from_secs(30)).unwrap();
        let req = pb::CriuReq { r#type: pb::CriuReqType::Version as i32, ..Default::default() };
        let reply = s.call(&req, &mut |_| Answer::Proceed).unwrap();
        assert!(reply.resp.success, "{:?}", reply.failure());
        let v = reply.resp.version.expect("a version");
        assert!((v.major_number, v.minor_number) >= (4, 2), "{v:?}");
        assert!(s.finish().unwrap().success());
    }

    /// A real dump over RPC: the notifications arrive in CRIU's order and wait for us; a refusal
    /// at `post-dump` fails the dump and CRIU lets the process run on.
    #[test]
    fn a_dump_over_rpc_notifies_and_a_refusal_fails_it() {
        use std::os::unix::process::CommandExt;
        let _one = SPAWNS.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = Command::new("/bin/sleep");
        sleeper.arg("1000").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // Its own session: CRIU dumps a session leader without --shell-job.
        // SAFETY: setsid is async-signal-safe.
        unsafe { sleeper.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from)) };
        let mut sleeper = sleeper.spawn().unwrap();
        let dump = |images: &Path, answer: Answer| {
            std::fs::create_dir_all(images).unwrap();
            let opts = pb::CriuOpts {
                images_dir_fd: -1,
                images_dir: Some(images.display().to_string()),
                pid: Some(sleeper.id() as i32),
                leave_running: Some(true),
                notify_scripts: Some(true),
                log_file: Some("dump.log".into()),
                log_level: Some(4),
                ..Default::default()
            };
            let req = pb::CriuReq { r#type: pb::CriuReqType::Dump as i32, opts: Some(opts), ..Default::default() };
            let mut s = Swrk::start(&criu(), &[], None, Instant::now() + Duration::from_secs(60)).unwrap();
            let r = s.call(&req, &mut |n| if n.script == "post-dump" { answer.clone() } else { Answer::Proceed });
            let _ = s.finish();
            r
        };
        let ok = dump(&dir.path().join("a"), Answer::Proceed).unwrap();
        assert!(
            ok.resp.success,
            "{:?}\n{}",
            ok.failure(),
            std::fs::read_to_string(dir.path().join("a/dump.log")).unwrap_or_default()
        );
        let pre = ok.notified.iter().position(|n| n == "pre-dump").expect("pre-dump notified");
        let post = ok.notified.iter().position(|n| n == "post-dump").expect("post-dump notified");
        assert!(pre < post, "{:?}", ok.notified);
        assert!(dir.path().join("a").join("inventory.img").is_file(), "CRIU wrote the images");

        let refused = dump(&dir.path().join("b"), Answer::Refuse("not today".into())).unwrap_err();
        assert!(
            matches!(&refused, RpcError::Refused { script, refused } if script == "post-dump" && refused == "not today"),
            "{refused}"
        );
        assert!(sleeper.try_wait().unwrap().is_none(), "the process runs on after a refused dump");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }

    /// CRIU resumes a restored tree whatever the answer to `pre-resume` (it only logs a
    /// refusal), so `Criu::restore` kills the tree itself before it answers one: the tree never
    /// runs again. With a `proceed` it does.
    #[test]
    fn a_refused_pre_resume_leaves_no_process_that_runs() {
        use std::os::unix::process::CommandExt;
        let _one = SPAWNS.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let (images, ticks) = (dir.path().join("images"), dir.path().join("ticks"));
        std::fs::create_dir(&images).unwrap();
        let mut ticker = Command::new("/bin/sh");
        let script = format!("while :; do date +%s%N > {}; sleep 0.05; done", ticks.display());
        ticker.args(["-c", &script]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe.
        unsafe { ticker.pre_exec(|| nix::unistd::setsid().map(drop).map_err(std::io::Error::from)) };
        let mut ticker = ticker.spawn().unwrap();
        let pid = ticker.id() as i32;
        while std::fs::read_to_string(&ticks).unwrap_or_default().is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let opts = pb::CriuOpts {
            images_dir_fd: -1,
            images_dir: Some(images.display().to_string()),
            pid: Some(pid),
            log_file: Some("dump.log".into()),
            log_level: Some(4),
            ..Default::default()
        };
        let req = pb::CriuReq { r#type: pb::CriuReqType::Dump as i32, opts: Some(opts), ..Default::default() };
        let mut s = Swrk::start(&criu(), &[], None, Instant::now() + Duration::from_secs(60)).unwrap();
        let dumped = s.call(&req, &mut |_| Answer::Proceed).unwrap();
        let _ = s.finish();
        assert!(dumped.resp.success, "{:?}", dumped.failure());
        ticker.wait().unwrap();
        // Its pid is free once nothing of its session is left (its children were killed too,
        // and are reaped by whoever inherited them).
        let session_ends = || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let in_session = || {
                let all = procfs::process::all_processes().unwrap();
                all.filter_map(Result::ok).any(|p| p.stat().is_ok_and(|s| s.session == pid || s.pgrp == pid))
            };
            while in_session() {
                assert!(Instant::now() < deadline, "the session of {pid} ends");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        session_ends();
        let at_dump = std::fs::read_to_string(&ticks).unwrap();
        let conf = dir.path().join("empty.conf");
        std::fs::write(&conf, "").unwrap();
        let args = crate::criu::RestoreArgs {
            images_dir: images.clone(),
            work_dir: dir.path().to_path_buf(),
            config_file: conf,
            options: Vec::new(),
            stdout_pipe_inode: None,
            streamed_from: None,
            lazy_pages: false,
        };
        let criu = crate::criu::Criu { path: criu(), version: "4.2.1".into() };
        let mut seen = Vec::new();
        let refused = criu.restore(
            &args,
            None,
            Duration::from_secs(60),
            &|_| {},
            &mut |n| {
                seen.push(n.script.clone());
                if n.script == "pre-resume" {
                    Answer::Refuse("not this one".into())
                } else {
                    Answer::Proceed
                }
            },
            None,
        );
        let log = std::fs::read_to_string(dir.path().join(super::super::argv::RESTORE_LOG)).unwrap_or_default();
        let err = refused.expect_err("a refused restore fails");
        assert_eq!(seen, ["post-restore", "pre-resume"], "the gate hears both: {err}\n{log}");
        assert!(log.contains("Pre-resume script ret code"), "CRIU went on after the refusal:\n{log}");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(std::fs::read_to_string(&ticks).unwrap(), at_dump, "the restored tree never ran");
        assert!(!crate::process::tree::alive(pid), "no process of it is left");

        // The same images, the gate proceeding: the tree runs on.
        session_ends();
        let restored =
            criu.restore(&args, None, Duration::from_secs(60), &|_| {}, &mut |_| Answer::Proceed, None).unwrap();
        assert_eq!(restored.pid, pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&ticks).unwrap_or_default() == at_dump {
            assert!(Instant::now() < deadline, "the restored tree runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Ours: just restored with this pid, in a session of its own running our script.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(String::from_utf8_lossy(&cmdline).contains(&ticks.display().to_string()));
        for p in crate::process::tree::descendants(pid).into_iter().rev() {
            // SAFETY: kill(2); the tree restored just above.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }

    #[test]
    fn a_silent_criu_is_killed_at_the_deadline() {
        let _one = SPAWNS.lock().unwrap_or_else(|p| p.into_inner());
        // `sleep` stands in for a criu that never answers.
        let mut s =
            Swrk::start(Path::new("/bin/sleep"), &[], None, Instant::now() + Duration::from_millis(200)).unwrap();
        let pid = s.pid();
        let req = pb::CriuReq { r#type: pb::CriuReqType::Version as i32, ..Default::default() };
        // sleep exits at once on its bad argument: the conversation ends or times out, never hangs.
        let err = s.call(&req, &mut |_| Answer::Proceed).unwrap_err();
        assert!(matches!(err, RpcError::Ended { .. } | RpcError::TimedOut { .. } | RpcError::Send(_)), "{err}");
        drop(s);
        assert!(crate::process::tree::exits_within(pid, Duration::from_secs(5)) || !crate::process::tree::alive(pid));
    }
}
