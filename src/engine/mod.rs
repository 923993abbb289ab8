//! The engine: taking a checkpoint (`dump`: CRIU's dump, the work at its `post-dump`
//! notification, settling the checkpoint, retention) and starting a service from one or cold
//! (`restore`: the proof a restore needs, CRIU's restore, the fallbacks). It owns the host's
//! dump and restore slots (`slots`), the progress lines of a long dump or restore
//! (`progress`) and which checkpoints are kept (`retention`). Each call gets what it works on
//! as a [`Job`] and returns a typed outcome; what to tell whom (the status, the log, systemd,
//! a kill-port client) is the caller's: the supervisor's. It uses `criu`, `process` and `store`
//! below it, and nothing of the supervisor above.

pub mod dump;
mod job;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod slots;

pub use job::Job;
