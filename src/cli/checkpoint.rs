//! `stasis checkpoint`: asks the supervisor, over its root-only control socket, for a dump that
//! leaves the service running.

use super::output::print_json;
use crate::config::load_named;
use crate::error::Error;
use crate::exit_codes;
use crate::paths::Dirs;
use crate::supervisor::{lock, protocol};
use std::io::Write;
use std::os::unix::net::UnixStream;

pub fn run(dirs: &Dirs, name: &str, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let paths = dirs.service(&service.name);
    if lock::holder(&paths.lock).is_none() {
        return Err(Error::NotRunning { service: service.name.clone() });
    }
    let mut stream =
        UnixStream::connect(&paths.control_socket).map_err(|e| Error::io("connect to", &paths.control_socket, e))?;
    stream
        .write_all(format!("{}\n", protocol::CHECKPOINT_COMMAND).as_bytes())
        .map_err(|e| Error::io("write to", &paths.control_socket, e))?;
    let (last, lines) = super::stop::relay(stream, json)?;
    match protocol::parse_final(&last) {
        Some(Ok(text)) => {
            if json {
                print_json(
                    &serde_json::json!({ "name": service.name, "ok": true, "checkpoint": protocol::checkpoint_id(&text), "lines": lines }),
                );
            }
            Ok(exit_codes::OK)
        }
        Some(Err(e)) => {
            if json {
                print_json(&serde_json::json!({ "name": service.name, "ok": false, "error": e, "lines": lines }));
                return Ok(exit_codes::CHECKPOINT_FAILED);
            }
            Err(Error::CheckpointFailed(format!("failed to checkpoint {}: {e}", service.name)))
        }
        None => Err(Error::CheckpointFailed(format!("the supervisor of {} gave no result", service.name))),
    }
}
