//! A cold-launched command's first second: one that exits at once is a failed start, told with
//! its exit status and last lines of output.

use super::StartError;
use crate::engine::restore::Started;
use std::os::fd::OwnedFd;

/// A cold-launched command must live through its first second: one that exits at once (a typo
/// in its arguments, a port it cannot bind) is a failed start, reported with its exit status and
/// its last lines of output, not "started".
pub fn survives_probation(s: &Started, name: &str, log: &super::log_pump::LogWriter) -> Result<(), StartError> {
    let pid = s.info.init_pid;
    if !crate::process::tree::exits_within(pid.as_raw(), PROBATION) {
        return Ok(());
    }
    let status = match nix::sys::wait::waitpid(pid, None) {
        Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => format!("exited with status {code}"),
        Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => format!("was killed by {sig}"),
        _ => "exited".to_string(),
    };
    let output = drain_available(&s.output);
    for line in output.lines() {
        log.note(&format!("output: {line}"));
    }
    let last: Vec<&str> = output.lines().rev().take(LAST_LINES).collect::<Vec<_>>().into_iter().rev().collect();
    let shown = if last.is_empty() {
        " and printed nothing".to_string()
    } else {
        format!("; its last output:\n{}", last.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"))
    };
    let before = match &s.info.fallback_reason {
        Some(why) => format!("\n(it was a cold start because {why})"),
        None => String::new(),
    };
    Err(StartError::StartFailed(format!(
        "failed to start {name}: the command {status} within its first second{shown}{before}\n(see `stasis logs {name}`)"
    )))
}

/// How long a cold-launched command must live to count as started.
const PROBATION: std::time::Duration = std::time::Duration::from_secs(1);
const LAST_LINES: usize = 10;

/// Whatever the dead service left in its output pipe (all writers are gone, so this ends).
fn drain_available(output: &OwnedFd) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match nix::unistd::read(output, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                if bytes.len() > 1 << 20 {
                    bytes.drain(..bytes.len() - (1 << 20));
                }
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Host PID of the service's main process, for status and the start report.
pub fn main_pid(init_pid: nix::unistd::Pid) -> Option<i32> {
    crate::process::tree::main_pid(init_pid.as_raw())
}
