//! The supervisor of one service: holds the service's lock, has the engine start it (restore or
//! cold launch), is the child subreaper and parent of its tree, pumps its output to the log, and
//! runs the state machine that turns kill-port connections, `checkpoint` requests, signals and
//! the service's exit into the engine's dumps and into shutdowns; it answers each request from
//! the engine's typed outcome, and reports what happened in one place (report.rs).

mod error;
mod event_loop;
mod holder;
mod idle;
mod kill_port;
pub mod lock;
mod log_pump;
pub mod metrics;
pub mod outcome;
mod peer;
mod probation;
pub mod protocol;
mod readiness;
pub mod ready;
mod report;
mod restart;
mod run;
pub mod state;
pub mod status;
mod systemd;

pub use error::{Ended, StartError, SupervisorError};
pub use run::run;

#[cfg(test)]
pub fn peer_lookup_for_fuzzing(
    table: &str,
    local: std::net::SocketAddrV4,
    peer: std::net::SocketAddrV4,
) -> Option<(u32, u64)> {
    peer::find(table, local, peer).map(|p| (p.uid, p.inode))
}
