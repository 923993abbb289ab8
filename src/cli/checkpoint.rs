//! `stasis checkpoint`: asks the supervisor, over its root-only control socket, for a dump that
//! leaves the service running.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::load_named;
use crate::paths::Dirs;
use crate::supervisor::lock;
use crate::supervisor::protocol::{self, Asked, Verdict};
use std::io::Write;
use std::os::unix::net::UnixStream;

pub fn run(dirs: &Dirs, name: &str, json: bool) -> Result<i32, Error> {
    ask(dirs, name, protocol::CHECKPOINT_COMMAND, json)
}

/// Sends `command` (`checkpoint`, or `doctor`'s dry run) to the supervisor and relays its answer.
pub fn ask(dirs: &Dirs, name: &str, command: &str, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let paths = dirs.service(&service.name);
    if lock::holder(&paths.lock).is_none() {
        return Err(Error::NotRunning { service: service.name.clone() });
    }
    let mut stream =
        UnixStream::connect(&paths.control_socket).map_err(|e| Error::io("connect to", &paths.control_socket, e))?;
    stream.write_all(format!("{command}\n").as_bytes()).map_err(|e| Error::io("write to", &paths.control_socket, e))?;
    let (last, lines) = super::stop::relay(stream, json)?;
    let asked = if command == protocol::DOCTOR_COMMAND { Asked::DryRun } else { Asked::Checkpoint };
    match Verdict::parse(&last, asked) {
        Some(verdict @ (Verdict::Saved { .. } | Verdict::DryRun { .. })) => {
            if json {
                let checkpoint = match verdict {
                    Verdict::Saved { id, .. } => Some(id),
                    _ => None,
                };
                print_json(
                    &serde_json::json!({ "name": service.name, "ok": true, "checkpoint": checkpoint, "lines": lines }),
                );
            }
            Ok(exit_codes::OK)
        }
        Some(Verdict::Failed(e)) => {
            if json {
                print_json(&serde_json::json!({ "name": service.name, "ok": false, "error": e, "lines": lines }));
                return Ok(exit_codes::CHECKPOINT_FAILED);
            }
            let what = if command == protocol::DOCTOR_COMMAND { "try a checkpoint of" } else { "checkpoint" };
            Err(Error::CheckpointFailed(format!("failed to {what} {}: {e}", service.name)))
        }
        Some(Verdict::Ended(_)) | None => {
            Err(Error::CheckpointFailed(format!("the supervisor of {} gave no result", service.name)))
        }
    }
}
