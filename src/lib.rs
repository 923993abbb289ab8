//! stasis as a library: a process checkpoint manager for Linux services, built on CRIU. The
//! `stasis` binary (src/main.rs) is a thin layer over it: it dispatches the hidden namespace-init
//! role, then runs the command line (`cli`).
//!
//! The layers, each using only those below it: `cli` (arguments, output, exit codes) over
//! `supervisor` (one service's lock, state machine and event loop, the kill port, and the one
//! reporter of status, counters, metrics and systemd) over `engine` (a dump, from CRIU's run
//! through its post-dump work to a settled checkpoint; a restore-or-cold start; each with a
//! typed outcome) over `criu` (the CRIU adapter: one RPC conversation per dump or restore, the
//! page server, the image streamer) and `process` (launching and reading the service's
//! processes) over `store` (the checkpoint store and its commit protocol) over `config` and the
//! small ground-floor modules (`paths`, `proc_maps`, `text`, `time_fmt`).

pub mod cli;
pub mod config;
pub mod criu;
pub mod engine;
#[cfg(test)]
mod fuzz;
pub mod paths;
pub mod proc_maps;
pub mod process;
pub mod store;
pub mod supervisor;
pub mod text;
pub mod time_fmt;
