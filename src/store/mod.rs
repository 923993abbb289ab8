//! The checkpoint store of one service: checkpoint directories that become visible only when
//! complete and durable, their manifests, and quarantine for checkpoints that failed to restore.

mod checkpoints;
pub mod durable;
mod error;
mod manifest;

pub use checkpoints::{Checkpoint, CheckpointStore, PendingCheckpoint};
pub use error::StoreError;
pub use manifest::{DumpKind, Manifest};

pub fn manifest_format() -> u32 {
    manifest::FORMAT
}
