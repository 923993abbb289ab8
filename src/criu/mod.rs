//! The CRIU adapter: finds and version-checks the `criu` binary once, talks to it over RPC
//! (`criu swrk`: rpc.rs, requests.rs) for dumps and restores, hands each notification to the
//! caller to answer (the engine does the post-dump work), and turns failures into errors that
//! quote the Error lines of CRIU's log together with the log's path.

mod argv;
mod binary;
pub mod diagnose;
mod error;
pub mod lazy;
pub mod lazy_guard;
pub mod log_capture;
mod log_errors;
pub mod network_lock;
pub mod page_server;
mod requests;
pub mod rpc;
pub mod standby;
pub mod stats;
pub mod streamer;

#[cfg(test)]
pub(crate) use log_errors::pick as pick_log_errors;

pub use argv::{DumpArgs, RestoreArgs, DUMP_LOG, PRE_DUMP_LOG};
pub use binary::Criu;
pub use error::{CriuError, RestoreFailure};
