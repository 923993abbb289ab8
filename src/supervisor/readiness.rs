//! `ready:`: when a started service counts as up. `tcp: HOST:PORT` (a connection is accepted)
//! or `exec: [cmd...]` (the command, run as the service user in its environment, exits 0),
//! tried until `ready_timeout`; or `notify`: the service sends `READY=1` to `$NOTIFY_SOCKET`,
//! as under systemd. A probe is a bounded start-up wait, never a poll of an idle service.

use super::context::Context;
use crate::config::Readiness;
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

const RETRY: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The socket a cold-launched `ready: notify` service reports to. Abstract (no file for the
/// service user to reach through root's directories) and named at random per launch; anyone
/// may send to it, so a message counts only if the kernel says it came from the service's tree.
pub struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    /// `$NOTIFY_SOCKET` for the service: `@` and the abstract name.
    pub address: String,
}

impl NotifySocket {
    pub fn bind(service: &str) -> std::io::Result<NotifySocket> {
        use std::os::linux::net::SocketAddrExt;
        let mut random = [0u8; 8];
        // SAFETY: fills the buffer it is given.
        if unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) } != random.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let name = format!("stasis/{service}/notify/{hex}");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)?;
        Ok(NotifySocket { socket, address: format!("@{name}") })
    }

    /// One datagram, with the host PID of its sender; None when there is none to read.
    fn receive(&self) -> Option<(Option<i32>, String)> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixCredentials};
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let msg = recvmsg::<()>(self.socket.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT).ok()?;
        let pid = msg.cmsgs().ok()?.find_map(|c| match c {
            ControlMessageOwned::ScmCredentials(cr) => Some(cr.pid()),
            _ => None,
        });
        let n = msg.bytes;
        Some((pid, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }
}

/// Waits until the service is ready; Err says why it is not (timed out, or it exited). A
/// restored service was ready when it was dumped, so `notify` (which it will not send again)
/// counts as done for it.
pub fn wait(ctx: &Context, init_pid: Pid, ready: &Readiness, notify: Option<&NotifySocket>) -> Result<(), String> {
    let deadline = Instant::now() + ctx.service.ready_timeout;
    if *ready == Readiness::Notify {
        return match notify {
            Some(socket) => wait_for_notify(ctx, init_pid, socket, deadline),
            None => Ok(()),
        };
    }
    loop {
        if !crate::process::tree::alive(init_pid.as_raw()) {
            return Err(format!("it exited before it was ready ({})", describe(ready)));
        }
        if probe(ctx, ready) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "it was not ready within ready_timeout ({}): {}",
                crate::time_fmt::human_duration(ctx.service.ready_timeout),
                describe(ready)
            ));
        }
        std::thread::sleep(RETRY);
    }
}

/// Sleeps in poll(2) on the socket and the service's pidfd: no timer, no probing.
fn wait_for_notify(ctx: &Context, init_pid: Pid, socket: &NotifySocket, deadline: Instant) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let pidfd = crate::process::tree::pidfd(init_pid.as_raw());
    let mut ignored: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let also = if ignored.is_empty() { String::new() } else { format!("; ignored {}", ignored.join(", ")) };
            return Err(format!(
                "it was not ready within ready_timeout ({}): it sent no READY=1 to $NOTIFY_SOCKET{also}",
                crate::time_fmt::human_duration(ctx.service.ready_timeout)
            ));
        }
        let mut fds = vec![libc::pollfd { fd: socket.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if let Some(fd) = &pidfd {
            fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: valid pollfds, as many as passed.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("failed to wait on $NOTIFY_SOCKET: {}", std::io::Error::last_os_error()));
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
            return Err(format!("it exited before it was ready ({})", describe(&Readiness::Notify)));
        }
    }
}

fn describe(ready: &Readiness) -> String {
    match ready {
        Readiness::Tcp(addr) => format!("nothing accepted a connection on {addr}"),
        Readiness::Exec(cmd) => format!("`{}` did not exit 0", cmd.join(" ")),
        Readiness::Notify => "it sent no READY=1 to $NOTIFY_SOCKET".to_string(),
    }
}

fn probe(ctx: &Context, ready: &Readiness) -> bool {
    match ready {
        Readiness::Notify => false,
        Readiness::Tcp(addr) => {
            use std::net::ToSocketAddrs;
            addr.to_socket_addrs()
                .map(|mut a| a.any(|a| std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok()))
                .unwrap_or(false)
        }
        Readiness::Exec(cmd) => {
            let s = &ctx.service;
            let mut c = std::process::Command::new(&cmd[0]);
            c.args(&cmd[1..])
                .env_clear()
                .envs(s.environment.iter().map(|(k, v)| (k, v)))
                .current_dir(&s.working_dir)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0);
            let (uid, gid, groups) = (s.uid, s.gid, s.supplementary_gids.clone());
            // SAFETY: only async-signal-safe calls between fork and exec; the privilege drop of
            // the service itself, in the same order (groups, gid, uid).
            unsafe {
                c.pre_exec(move || {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let Ok(mut child) = c.spawn() else { return false };
            if crate::process::tree::exits_within(child.id() as i32, PROBE_TIMEOUT) {
                child.wait().is_ok_and(|st| st.success())
            } else {
                // SAFETY: the probe's own group (process_group(0)), our unreaped child.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                false
            }
        }
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
        format!("; its last output:\n{}", lines.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"))
    }
}
