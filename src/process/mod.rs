//! The service's processes: the cold launch into fresh PID and IPC namespaces under a small
//! root-owned init (`ns_init`), the content-addressed copy of that init, and reading the
//! running tree from /proc, and the socket a `ready: notify` service reports to.

mod error;
pub mod init_binary;
mod launch;
mod notify;
pub mod ns_init;
pub mod tree;

pub use error::LaunchError;
pub use launch::{cold_launch, LaunchSpec};
pub use notify::NotifySocket;
