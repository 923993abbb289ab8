//! `ready:`: when a started service counts as up. `tcp: HOST:PORT` (a connection is accepted)
//! or `exec: [cmd...]` (the command, run as the service user in its environment, exits 0),
//! tried until `ready_timeout`. A probe is a bounded start-up wait, never a poll of an idle
//! service.

use super::context::Context;
use crate::config::Readiness;
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

const RETRY: Duration = Duration::from_millis(100);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until the service is ready; Err says why it is not (timed out, or it exited).
pub fn wait(ctx: &Context, init_pid: Pid, ready: &Readiness) -> Result<(), String> {
    let deadline = Instant::now() + ctx.service.ready_timeout;
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

fn describe(ready: &Readiness) -> String {
    match ready {
        Readiness::Tcp(addr) => format!("nothing accepted a connection on {addr}"),
        Readiness::Exec(cmd) => format!("`{}` did not exit 0", cmd.join(" ")),
    }
}

fn probe(ctx: &Context, ready: &Readiness) -> bool {
    match ready {
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
