//! `stasis doctor NAME`: a dry-run dump through the supervisor, which throws it away: whether
//! the service can be checkpointed now, and if not, what blocks it and the fix.

use super::error::Error;
use crate::paths::Dirs;
use crate::supervisor::protocol;

pub fn run(dirs: &Dirs, name: &str, json: bool) -> Result<i32, Error> {
    super::checkpoint::ask(dirs, name, protocol::DOCTOR_COMMAND, json)
}
