//! The exit codes of every `stasis` command, one per kind of failure. Documented in
//! `docs/exit-codes.md`; scripts rely on them, so never renumber.

/// The command did what was asked (including `stop` of a service that is already stopped).
pub const OK: i32 = 0;
/// An unexpected internal failure (a bug, or an I/O error nobody anticipated).
pub const INTERNAL: i32 = 1;
/// The command line was malformed (clap's own code).
pub const USAGE: i32 = 2;
/// A service file is missing or invalid: YAML syntax, unknown key, bad value, missing user.
pub const CONFIG: i32 = 3;
/// `start` of a service that is already running.
pub const ALREADY_RUNNING: i32 = 4;
/// A checkpoint could not be taken; the service keeps running and earlier checkpoints are intact.
pub const CHECKPOINT_FAILED: i32 = 5;
/// The service could not be started (neither restored nor cold-launched), or it died at once.
pub const START_FAILED: i32 = 6;
/// The host is not ready: not root, CRIU missing or too old, kill port in use, unwritable directories.
pub const ENVIRONMENT: i32 = 7;
/// The command needs a running service and the service is not running.
pub const NOT_RUNNING: i32 = 8;
/// The checkpoint store is damaged or out of space in a way the command could not work around.
pub const STORE: i32 = 9;
/// `start` would not restore the checkpoint it had to (`--from ID`, or `on_incompatible: fail`)
/// and did not cold-start either; the checkpoint is kept.
pub const RESTORE_REFUSED: i32 = 10;
/// `import` refused the archive (not a stasis export, damaged, or it does not fit this host:
/// other binaries, an older CRIU); nothing was added.
pub const IMPORT_REFUSED: i32 = 11;
/// `stop` interrupted (Ctrl-C) after it asked for the stop: the supervisor carries on with the
/// checkpoint and stops the service; the message says how to follow it. 128 + SIGINT, as a shell.
pub const INTERRUPTED: i32 = 130;
