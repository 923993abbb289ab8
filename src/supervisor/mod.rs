//! The supervisor of one service: holds the service's lock, starts it (restore or cold launch),
//! is the child subreaper and parent of its tree, pumps its output to the log, and runs the
//! state machine that turns kill-port connections, `checkpoint` requests, signals and the
//! service's exit into dumps and shutdowns.

mod checkpoint;
mod context;
mod error;
mod event_loop;
mod holder;
mod kill_port;
mod lazy_start;
pub mod lock;
mod log_pump;
pub mod metrics;
mod peer;
mod progress;
pub mod protocol;
mod readiness;
pub mod ready;
mod restart;
mod retention;
mod run;
mod slots;
mod startup;
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
