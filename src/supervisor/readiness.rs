//! `ready:`: when a started service counts as up. `tcp: HOST:PORT` (a connection is accepted)
//! or `exec: [cmd...]` (the command, run as the service user in its environment, exits 0),
//! tried until `ready_timeout`; or `notify`: the service sends `READY=1` to `$NOTIFY_SOCKET`,
//! as under systemd. A probe is a bounded start-up wait, never a poll of an idle service.
//! Each second of a wait is reported (what it waits for, how long so far, of how long) to
//! whoever started it.

use crate::config::Readiness;
use crate::engine::Job;
use crate::process::NotifySocket;
use crate::time_fmt::human_duration;
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

const RETRY: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Says each second of a wait what it waits for (a `Progress: waiting for ...` line).
struct Ticker<'a> {
    started: Instant,
    next: Instant,
    what: String,
    limit: Duration,
    report: &'a dyn Fn(String),
}

impl Ticker<'_> {
    fn new<'a>(ready: &Readiness, limit: Duration, report: &'a dyn Fn(String)) -> Ticker<'a> {
        let started = Instant::now();
        Ticker { started, next: started + crate::engine::progress::EVERY, what: waiting_for(ready), limit, report }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next {
            self.next = now + crate::engine::progress::EVERY;
            (self.report)(crate::engine::progress::waiting(&self.what, now - self.started, self.limit));
        }
    }

    /// How long until the next report is due.
    fn due_in(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }
}

/// Why a started service did not count as up; the text reads after "failed to start NAME: ".
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("it exited before it was ready ({})", describe(ready))]
    Exited { ready: Readiness },
    /// `last` is why the last probe could not even run, if it could not.
    #[error("it was not ready within ready_timeout ({}): {}{}", human_duration(*timeout), describe(ready), last.as_ref().map(|w| format!("; {w}")).unwrap_or_default())]
    TimedOut { ready: Readiness, timeout: Duration, last: Option<ProbeError> },
    /// `ignored`: the READY=1 messages that came from outside the service's tree.
    #[error("it was not ready within ready_timeout ({}): it sent no READY=1 to $NOTIFY_SOCKET{}", human_duration(*timeout), if ignored.is_empty() { String::new() } else { format!("; ignored {}", ignored.join(", ")) })]
    NoNotify { timeout: Duration, ignored: Vec<String> },
    #[error("failed to wait on $NOTIFY_SOCKET: {0}")]
    Poll(std::io::Error),
    #[error("the readiness check failed: {0}")]
    Panicked(tokio::task::JoinError),
}

/// Why a probe could not run (not: why it did not pass yet).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("working_dir {} holds a NUL byte", .0.display())]
    NulInWorkingDir(std::path::PathBuf),
    #[error("failed to create a pipe for the readiness probe: {0}")]
    Pipe(nix::Error),
    /// `step` is the one of [`STEPS`] that failed in the child, `target` the directory it entered.
    #[error("the probe `{command}` could not {step}{target} as uid {uid}: {source}")]
    Spawn { command: String, step: &'static str, target: String, uid: u32, source: std::io::Error },
}

/// Waits until the service is ready; Err says why it is not (timed out, or it exited). A
/// restored service was ready when it was dumped, so `notify` (which it will not send again)
/// counts as done for it. `report` hears a line each second of the wait.
pub fn wait(
    ctx: &Job,
    init_pid: Pid,
    ready: &Readiness,
    notify: Option<&NotifySocket>,
    report: &dyn Fn(String),
) -> Result<(), NotReady> {
    let deadline = Instant::now() + ctx.service.ready_timeout;
    let mut ticker = Ticker::new(ready, ctx.service.ready_timeout, report);
    if *ready == Readiness::Notify {
        return match notify {
            Some(socket) => wait_for_notify(ctx, init_pid, socket, deadline, &mut ticker),
            None => Ok(()),
        };
    }
    let mut last_failure = None;
    loop {
        ticker.tick();
        if !crate::process::tree::alive(init_pid.as_raw()) {
            return Err(NotReady::Exited { ready: ready.clone() });
        }
        match probe(ctx, ready) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(why) => last_failure = Some(why),
        }
        if Instant::now() >= deadline {
            let (ready, timeout) = (ready.clone(), ctx.service.ready_timeout);
            return Err(NotReady::TimedOut { ready, timeout, last: last_failure });
        }
        std::thread::sleep(RETRY);
    }
}

/// Sleeps in poll(2) on the socket and the service's pidfd: no timer, no probing.
fn wait_for_notify(
    ctx: &Job,
    init_pid: Pid,
    socket: &NotifySocket,
    deadline: Instant,
    ticker: &mut Ticker,
) -> Result<(), NotReady> {
    use std::os::fd::AsRawFd;
    let pidfd = crate::process::tree::pidfd(init_pid.as_raw());
    let mut ignored: Vec<String> = Vec::new();
    loop {
        ticker.tick();
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NotReady::NoNotify { timeout: ctx.service.ready_timeout, ignored });
        }
        let mut fds = vec![libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(fd) = &pidfd {
            fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        // Woken for the next progress report too: the wait is bounded by ready_timeout anyway.
        let ms = left.min(ticker.due_in()).as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: valid pollfds, as many as passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(NotReady::Poll(std::io::Error::last_os_error()));
        }
        while let Some((pid, text)) = socket.receive() {
            if !text.lines().any(|l| l.trim() == "READY=1") {
                continue;
            }
            let ours = pid.is_some_and(|p| crate::process::tree::descendants(init_pid.as_raw()).contains(&p));
            if ours {
                return Ok(());
            }
            let who = pid.map(|p| format!("READY=1 from pid {p}, which is not a process of the service"));
            let who = who.unwrap_or_else(|| "READY=1 without its sender's credentials".into());
            tracing::warn!("{}: {who}", ctx.service.name);
            ignored.push(who);
        }
        let exited = fds.get(1).is_some_and(|p| p.revents & libc::POLLIN != 0);
        if exited || !crate::process::tree::alive(init_pid.as_raw()) {
            return Err(NotReady::Exited { ready: Readiness::Notify });
        }
    }
}

/// What a wait waits for, after "waiting for ".
fn waiting_for(ready: &Readiness) -> String {
    match ready {
        Readiness::Tcp(addr) => format!("{addr} to accept connections"),
        Readiness::Exec(cmd) => format!("`{}` to exit 0", cmd.join(" ")),
        Readiness::Notify => "READY=1 on $NOTIFY_SOCKET".to_string(),
    }
}

fn describe(ready: &Readiness) -> String {
    match ready {
        Readiness::Tcp(addr) => format!("nothing accepted a connection on {addr}"),
        Readiness::Exec(cmd) => format!("`{}` did not exit 0", cmd.join(" ")),
        Readiness::Notify => "it sent no READY=1 to $NOTIFY_SOCKET".to_string(),
    }
}

/// One try; Err says why it did not pass, when that is more than "not yet" (a probe that could
/// not even start), so a readiness timeout can say it.
fn probe(ctx: &Job, ready: &Readiness) -> Result<bool, ProbeError> {
    match ready {
        Readiness::Notify => Ok(false),
        Readiness::Tcp(addr) => {
            use std::net::ToSocketAddrs;
            Ok(addr
                .to_socket_addrs()
                .map(|mut a| a.any(|a| std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok()))
                .unwrap_or(false))
        }
        Readiness::Exec(cmd) => probe_exec(ctx, cmd),
    }
}

/// The steps a probe's child takes between fork and exec, in order; on failure the child writes
/// the step's number to a pipe so the message can name it (spawn itself only gets the errno).
const STEPS: [&str; 4] = ["set the supplementary groups", "set the gid", "set the uid", "enter the working directory"];

/// Runs the check command as the service user. The working directory is entered only after the
/// privilege drop (not with `Command::current_dir`, which std applies before `pre_exec`): it is
/// a path the service may control, and root must never follow it.
fn probe_exec(ctx: &Job, cmd: &[String]) -> Result<bool, ProbeError> {
    use std::os::fd::AsRawFd;
    let s = &ctx.service;
    let workdir = std::ffi::CString::new(s.working_dir.as_os_str().as_encoded_bytes())
        .map_err(|_| ProbeError::NulInWorkingDir(s.working_dir.clone()))?;
    let (step_r, step_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK).map_err(ProbeError::Pipe)?;
    let mut c = std::process::Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .env_clear()
        .envs(s.environment.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    let (uid, gid, groups) = (s.uid, s.gid, s.supplementary_gids.clone());
    let step_fd = step_w.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec; the privilege drop of the
    // service itself, in the same order (groups, gid, uid), then chdir as the service user.
    unsafe {
        c.pre_exec(move || {
            let failed = |step: u8| {
                let err = std::io::Error::last_os_error();
                libc::write(step_fd, (&step as *const u8).cast(), 1);
                Err(err)
            };
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                return failed(0);
            }
            if libc::setgid(gid) != 0 {
                return failed(1);
            }
            if libc::setuid(uid) != 0 {
                return failed(2);
            }
            if libc::chdir(workdir.as_ptr()) != 0 {
                return failed(3);
            }
            Ok(())
        });
    }
    let spawned = c.spawn();
    drop(c);
    drop(step_w);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let mut step = [0u8; 1];
            let what = match nix::unistd::read(&step_r, &mut step) {
                Ok(1) => STEPS.get(step[0] as usize).copied().unwrap_or("start it"),
                _ => "start it",
            };
            let target = if what == STEPS[3] { format!(" {}", s.working_dir.display()) } else { String::new() };
            return Err(ProbeError::Spawn { command: cmd.join(" "), step: what, target, uid, source: e });
        }
    };
    if crate::process::tree::exits_within(child.id() as i32, PROBE_TIMEOUT) {
        Ok(child.wait().is_ok_and(|st| st.success()))
    } else {
        // SAFETY: the probe's own group (process_group(0)), our unreaped child.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
        Ok(false)
    }
}

/// The last `n` lines of the service's log, as a block for an error message.
pub fn last_lines(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).map(|b| {
        let start = b.len().saturating_sub(64 * 1024);
        String::from_utf8_lossy(&b[start..]).into_owned()
    });
    let Ok(text) = text else { return String::new() };
    let lines: Vec<&str> = text.lines().rev().take(n).collect::<Vec<_>>().into_iter().rev().collect();
    if lines.is_empty() {
        String::new()
    } else {
        // The service's own bytes, about to be shown to the operator: escaped.
        let shown: Vec<String> = lines.iter().map(|l| format!("    {}", crate::text::escape_controls(l))).collect();
        format!("; its last output:\n{}", shown.join("\n"))
    }
}
