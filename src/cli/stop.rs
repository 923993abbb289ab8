//! `stasis stop`: connects to the kill port, exactly as an init script or telnet would, relays
//! what the supervisor says, and waits until the supervisor is gone.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::load_named;
use crate::paths::Dirs;
use crate::supervisor::lock;
use crate::supervisor::protocol::{self, Asked, Verdict};
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::time::Duration;

/// How long to wait for the supervisor to exit after it reported the checkpoint.
const EXIT_WAIT: Duration = Duration::from_secs(30);

/// What stopping one service came to.
pub enum StopOutcome {
    AlreadyStopped,
    /// The checkpoint is durable and the service gone.
    Checkpointed {
        id: Option<String>,
        lines: Vec<String>,
    },
    /// The checkpoint failed; the service keeps running.
    Failed {
        error: String,
        lines: Vec<String>,
    },
}

pub fn run(dirs: &Dirs, name: &str, json: bool) -> Result<i32, Error> {
    let service = load_named(dirs, name)?;
    explain_interrupts(&service.name);
    match stop_one(dirs, &service, !json)? {
        StopOutcome::AlreadyStopped => {
            if json {
                print_json(
                    &serde_json::json!({ "name": service.name, "stopped": false, "message": "already stopped" }),
                );
            } else {
                println!("{} is already stopped", service.name);
            }
            Ok(exit_codes::OK)
        }
        StopOutcome::Checkpointed { id, lines } => {
            if json {
                print_json(&serde_json::json!({
                    "name": service.name, "stopped": true, "checkpoint": id, "lines": lines,
                }));
            }
            Ok(exit_codes::OK)
        }
        StopOutcome::Failed { error, lines } => {
            if json {
                print_json(
                    &serde_json::json!({ "name": service.name, "stopped": false, "error": error, "lines": lines }),
                );
                return Ok(exit_codes::CHECKPOINT_FAILED);
            }
            Err(Error::CheckpointFailed(format!("failed to checkpoint {}: {error}", service.name)))
        }
    }
}

/// Stops one service through its kill port; `echo` prints the supervisor's lines as they come.
pub fn stop_one(dirs: &Dirs, service: &crate::config::Service, echo: bool) -> Result<StopOutcome, Error> {
    let paths = dirs.service(&service.name);
    // Root, or the service's own user (whom the kill port accepts too); the run dir and its lock
    // are root-only, so the service user learns "not running" from a refused connection.
    let root = nix::unistd::geteuid().is_root();
    if !root && nix::unistd::getuid().as_raw() != service.uid {
        return Err(Error::NotAllowed(format!(
            "only root or {}'s service user (uid {}) may stop it; try `sudo stasis stop {}`",
            service.name, service.uid, service.name
        )));
    }
    if root && lock::holder(&paths.lock).is_none() {
        return Ok(StopOutcome::AlreadyStopped);
    }
    let mut stream = match TcpStream::connect(("127.0.0.1", service.kill_port)) {
        Err(e) if !root && e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(StopOutcome::AlreadyStopped),
        other => other,
    }
    .map_err(|e| {
        Error::CheckpointFailed(format!(
            "failed to connect to the kill port 127.0.0.1:{} of {}: {e}; its supervisor may be starting or stuck (see `stasis logs {}`)",
            service.kill_port, service.name, service.name
        ))
    })?;
    // Says at once what it wants, so the supervisor need not wait to tell it from a browser.
    // Marked first: a Ctrl-C in between had better send the operator to `status` than claim
    // the service keeps running.
    ASKED.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = std::io::Write::write_all(&mut stream, format!("{}\n", protocol::STOP_COMMAND).as_bytes());
    tracing::debug!("stop: connected");
    let (final_line, lines) = relay(stream, !echo)?;
    tracing::debug!("stop: final line");
    match Verdict::parse(&final_line, Asked::Checkpoint) {
        Some(Verdict::Saved { id, .. }) => {
            if root {
                lock::wait_released(&paths.lock, EXIT_WAIT);
            }
            Ok(StopOutcome::Checkpointed { id: Some(id), lines })
        }
        Some(Verdict::Failed(error)) => Ok(StopOutcome::Failed { error, lines }),
        Some(Verdict::DryRun { .. } | Verdict::Ended(_)) | None => Err(Error::CheckpointFailed(format!(
            "the supervisor of {} closed the connection without a result; see `stasis logs {}`",
            service.name, service.name
        ))),
    }
}

/// The longest line kept from the supervisor: its lines are short, and whatever holds the port
/// (a stranger's program, once the service is stopped) must not make the CLI hold an endless one.
const MAX_LINE: usize = 64 << 10;
/// Bytes of lines kept for the result; the oldest go first (the last line is the verdict).
const MAX_KEPT: usize = 1 << 20;

/// Set once the supervisor has been asked to stop: from then on the stop goes on without us.
static ASKED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ctrl-C (SIGINT) while `stop` waits: once asked, the supervisor carries on with the
/// checkpoint and stops the service whatever happens to this command, so say so and how to
/// follow it, and exit with `INTERRUPTED`. SIGINT is blocked here, before any other thread
/// exists (they inherit the mask), and taken by one thread of its own.
fn explain_interrupts(name: &str) {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    if set.thread_block().is_err() {
        return;
    }
    let name = name.to_string();
    std::thread::spawn(move || {
        if set.wait().is_err() {
            return;
        }
        if ASKED.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!(
                "\nstasis: interrupted; the checkpoint of {name} continues in its supervisor, which stops the service when it is saved: follow it with `stasis status {name}` or `stasis logs {name}`"
            );
            std::process::exit(exit_codes::INTERRUPTED);
        }
        eprintln!("\nstasis: interrupted before the stop was asked for; {name} keeps running");
        std::process::exit(exit_codes::INTERRUPTED);
    });
}

/// Prints each line as it arrives (unless json) and returns the last one plus all of them (the
/// last MiB of them; a line over 64 KiB is cut there).
/// On a terminal, `Progress:` lines update one status line in place; elsewhere every line is
/// printed as it is (no carriage returns in logs and pipes).
pub fn relay<R: std::io::Read>(stream: R, json: bool) -> Result<(String, Vec<String>), Error> {
    use std::io::Read;
    let failed = |e: std::io::Error| Error::CheckpointFailed(format!("failed to read from the supervisor: {e}"));
    let shown = super::output::ProgressLines::new(json);
    let mut reader = BufReader::new(stream);
    let mut last = String::new();
    let mut all = std::collections::VecDeque::new();
    let mut kept = 0usize;
    loop {
        let mut bytes = Vec::new();
        if (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut bytes).map_err(failed)? == 0 {
            break;
        }
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        } else if bytes.len() > MAX_LINE {
            bytes.truncate(MAX_LINE);
            reader.skip_until(b'\n').map_err(failed)?;
            // Cut anywhere, maybe inside a character: only that one is replaced.
            bytes = String::from_utf8_lossy(&bytes).into_owned().into_bytes();
        }
        let line = String::from_utf8(bytes).map_err(|_| {
            failed(std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
        })?;
        shown.show(&line);
        last = line.clone();
        kept += line.len() + std::mem::size_of::<String>();
        all.push_back(line);
        while kept > MAX_KEPT {
            let Some(old) = all.pop_front() else { break };
            kept -= old.len() + std::mem::size_of::<String>();
        }
    }
    shown.finish();
    Ok((last, all.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    // Found by fuzz_control_replies: a flood without a newline (or of newlines) from whoever
    // answers on the port made the CLI hold all of it (32 MiB for 24 MiB) (and a line per newline, forever).
    #[test]
    fn an_endless_line_or_endless_lines_are_held_within_bounds() {
        for fill in [b'x', b'\n'] {
            let stream = std::io::repeat(fill).take(8 << 20).chain(&b"\nOK checkpoint a saved\n"[..]);
            let (got, peak) = crate::fuzz::peak_heap(|| relay(stream, true));
            let (last, lines) = got.unwrap();
            assert!(peak < 4 << 20, "{peak} bytes of heap");
            assert_eq!(last, "OK checkpoint a saved");
            assert!(lines.iter().map(|l| l.len() + 24).sum::<usize>() <= MAX_KEPT, "{} lines", lines.len());
            assert!(lines.iter().all(|l| l.len() <= MAX_LINE));
        }
        let (last, lines) = relay(&b"Saving...\r\nOK checkpoint b saved"[..], true).unwrap();
        assert_eq!((last.as_str(), lines.len()), ("OK checkpoint b saved", 2));
    }
}
