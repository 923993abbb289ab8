//! The checkpoint store of one service: checkpoint directories that become visible only when
//! complete and durable, their manifests and checksums, the generation counter that orders them
//! and tells fresh from stale, retention, quarantine for checkpoints that failed to restore, and
//! the cache of file identities used to tell whether a checkpoint still fits the program on disk.

pub mod archive;
pub mod chain;
mod checkpoints;
pub mod chunks;
pub mod compress;
pub mod counters;
pub mod durable;
mod error;
pub mod finalize;
pub mod frames;
pub mod generation;
pub mod identity;
pub mod images;
mod manifest;
pub mod random;
pub mod safe_open;
pub mod seal;
pub mod shm;
pub mod stored;
pub mod tmpfs;
pub mod tree_files;
pub mod verify;
pub mod written;

pub use checkpoints::{
    generation_of_id, Checkpoint, CheckpointStore, ListedCheckpoint, PendingCheckpoint, QuarantinedCheckpoint,
};
pub use error::StoreError;
pub use generation::Freshness;
pub use manifest::{Compression, DumpKind, Encryption, FileIdentity, ImageFile, Manifest, ParentRef, Timings};

/// A checkpoint's images directory, as the manifest names it.
pub const IMAGES_DIR: &str = manifest::IMAGES_DIR;

pub fn manifest_format() -> u32 {
    manifest::FORMAT
}
