//! `stasis stop NAME --no-checkpoint`: the ordinary stop, through the supervisor's root-only
//! control socket. The supervisor sends SIGTERM to the service's init (which passes it to every
//! process of the tree), SIGKILL after `stop_timeout_secs`, answers once the tree is gone and
//! exits; no checkpoint is taken. Also says what the next `start` will do with the checkpoints
//! there are, since all of them are older than the run that just ended.

use super::exit_codes;
use super::output::print_json;
use super::verb_error::VerbError;
use crate::config::{load_named, Service};
use crate::paths::Dirs;
use crate::store::{CheckpointStore, Freshness};
use crate::supervisor::lock;
use crate::supervisor::protocol::{self, Asked, Verdict};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Beyond the grace period: the supervisor reaps the tree and drains its output (at most 15 s
/// each) before it answers.
const ANSWER_MARGIN: Duration = Duration::from_secs(60);
/// How long to wait for the supervisor to exit after it answered.
const EXIT_WAIT: Duration = Duration::from_secs(30);

pub enum Terminated {
    AlreadyStopped,
    /// The tree is gone; `how` is the supervisor's word on how it ended.
    Stopped {
        how: String,
        lines: Vec<String>,
    },
}

pub fn run(dirs: &Dirs, name: &str, json: bool) -> Result<i32, VerbError> {
    super::require_root()?;
    let service = load_named(dirs, name).map_err(super::error::Error::from)?;
    let outcome = stop_without_checkpoint(dirs, &service, !json)?;
    let next = next_start(dirs, &service);
    let (stopped, how, lines) = match outcome {
        Terminated::AlreadyStopped => (false, format!("{} is already stopped", service.name), Vec::new()),
        Terminated::Stopped { how, lines } => (true, how, lines),
    };
    if json {
        print_json(&serde_json::json!({
            "name": service.name, "stopped": stopped, "checkpoint": null, "how": how,
            "newest_checkpoint": next.newest, "next_start": next.what, "note": next.note, "lines": lines,
        }));
        return Ok(exit_codes::OK);
    }
    if stopped {
        println!("{} {how}", service.name);
    } else {
        println!("{how}");
    }
    println!("{}", next.note);
    Ok(exit_codes::OK)
}

/// Asks the supervisor to stop the service without a checkpoint and waits until it has exited.
/// `echo` prints the supervisor's lines as they come.
pub fn stop_without_checkpoint(dirs: &Dirs, service: &Service, echo: bool) -> Result<Terminated, VerbError> {
    let paths = dirs.service(&service.name);
    if lock::holder(&paths.lock).is_none() {
        return Ok(Terminated::AlreadyStopped);
    }
    let socket_error =
        |source| VerbError::ControlSocket { service: service.name.clone(), path: paths.control_socket.clone(), source };
    let mut stream = match UnixStream::connect(&paths.control_socket) {
        // It exited between the two looks.
        Err(_) if lock::holder(&paths.lock).is_none() => return Ok(Terminated::AlreadyStopped),
        other => other.map_err(socket_error)?,
    };
    // Every wait has a deadline: the grace period, then the supervisor's own bounded clean-up.
    stream.set_read_timeout(Some(service.stop_timeout + ANSWER_MARGIN)).map_err(socket_error)?;
    stream.write_all(format!("{}\n", protocol::TERMINATE_COMMAND).as_bytes()).map_err(socket_error)?;
    let (last, lines) = super::stop::relay(stream, !echo)?;
    let failed = |why: String| VerbError::StopFailed { service: service.name.clone(), why };
    match Verdict::parse(&last, Asked::Terminate) {
        Some(Verdict::Ended(how)) => {
            if !lock::wait_released(&paths.lock, EXIT_WAIT) {
                return Err(failed(format!(
                    "the service is gone but its supervisor still runs after {} s; see `stasis logs {}`",
                    EXIT_WAIT.as_secs(),
                    service.name
                )));
            }
            Ok(Terminated::Stopped { how, lines })
        }
        Some(Verdict::Failed(why)) => Err(failed(why)),
        Some(Verdict::Saved { .. } | Verdict::DryRun { .. }) | None => Err(failed(format!(
            "the supervisor closed the connection without a result; see `stasis logs {}`",
            service.name
        ))),
    }
}

/// What the next `start` will restore, in words and for scripts.
pub struct NextStart {
    pub newest: Option<String>,
    /// `restore` or `cold`.
    pub what: &'static str,
    pub note: String,
}

pub fn next_start(dirs: &Dirs, service: &Service) -> NextStart {
    let store = CheckpointStore::new(&dirs.service(&service.name));
    let name = &service.name;
    let Some(cp) = store.latest().ok().flatten() else {
        return NextStart {
            newest: None,
            what: "cold",
            note: format!("{name} has no checkpoint; `stasis start {name}` will cold-start"),
        };
    };
    let id = cp.id.clone();
    let (what, note) = match store.generations().freshness(cp.manifest.generation, cp.manifest.kind) {
        Freshness::Fresh => ("restore", format!("the newest checkpoint {id} is fresh; `stasis start {name}` restores it")),
        Freshness::Stale(_) if service.restore_stale => (
            "restore",
            format!(
                "the newest checkpoint {id} is older than this run; `stasis start {name}` will restore it anyway (restore_stale: true), bringing back older memory"
            ),
        ),
        Freshness::Stale(_) => (
            "cold",
            format!(
                "the newest checkpoint {id} is older than this run; `stasis start {name}` will cold-start unless `restore_stale: true` is set, or you run `stasis start {name} --from {id}`"
            ),
        ),
    };
    NextStart { newest: Some(id), what, note }
}
