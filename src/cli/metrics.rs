//! `stasis metrics`: the Prometheus text exposition of every service (see `crate::supervisor::metrics`).

use super::error::Error;
use super::exit_codes;
use crate::paths::Dirs;

pub fn run(dirs: &Dirs) -> Result<i32, Error> {
    // The state is root-only: without root every service would look absent.
    super::require_root()?;
    print!("{}", crate::supervisor::metrics::render(dirs));
    Ok(exit_codes::OK)
}
