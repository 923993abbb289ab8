//! What a dump is taken against. Where the kernel tracks dirty pages (soft-dirty), a service
//! with `checkpoint_every` has its keep-running dumps (periodic ones and `stasis checkpoint`)
//! taken with CRIU's `track_mem`: the first is full, the next ones hold only the pages written
//! since the previous one (its `parent`), and after `full_every` of those a full one starts a
//! new chain. A stop instead copies the memory first while the service runs (a pre-dump, kept
//! inside the checkpoint: see pre_copy.rs), so the freeze covers only what changed since.
//!
//! The soft-dirty bits belong to whichever CRIU run cleared them last, so a parent is used
//! only when this supervisor knows it was that run: [`Tracked`] is set when a tracked dump
//! became a checkpoint, and cleared before any run that clears the bits (a failed dump may have
//! cleared them and left no checkpoint). It lives in memory: a new supervisor, a restored tree
//! (every page dirty again) or another process start from a full dump.

use crate::engine::Job;
use crate::store::{Checkpoint, DumpKind, ParentRef};

/// The last tracked dump of the running tree, which its soft-dirty bits are relative to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// The tree's root, and when it started (a reused pid is another process).
    pub init_pid: i32,
    pub started: u64,
    /// The checkpoint that dump made.
    pub checkpoint: String,
    /// Incremental checkpoints since the last full one (0: it was full).
    pub depth: u32,
}

/// What one dump is taken against.
#[derive(Debug, Clone)]
pub enum Base {
    /// A full dump that leaves the soft-dirty bits alone (no tracking here, or not asked for).
    Full,
    /// A full dump that starts a chain (`track_mem`).
    Tracked,
    /// Only the pages written since `parent` (`track_mem` + `parent_img`); `depth` is the new
    /// checkpoint's place in the chain.
    Parent { parent: Box<Checkpoint>, depth: u32 },
}

impl Base {
    pub fn track_mem(&self) -> bool {
        !matches!(self, Base::Full)
    }

    pub fn depth(&self) -> u32 {
        match self {
            Base::Parent { depth, .. } => *depth,
            _ => 0,
        }
    }

    /// What the manifest records of the parent.
    pub fn parent_ref(&self) -> Option<ParentRef> {
        match self {
            Base::Parent { parent, .. } => {
                Some(ParentRef { id: parent.id.clone(), content_hash: parent.manifest.content_hash() })
            }
            _ => None,
        }
    }
}

/// Whether this host and service dump with `track_mem` at all: the kernel tracks dirty pages,
/// and the images are not sealed (CRIU reads the parent's `inventory.img` itself, and a
/// restore reads every link's pages in the clear).
pub fn tracking_possible(ctx: &Job) -> bool {
    ctx.dirty_tracking() && ctx.service.encryption_key_file.is_none()
}

/// The base of a dump of kind `kind` of the tree of `init_pid`.
pub fn plan(ctx: &Job, init_pid: i32, kind: DumpKind, dry: bool) -> Base {
    if dry || kind == DumpKind::Stop || ctx.service.checkpoint_every.is_none() || !tracking_possible(ctx) {
        return Base::Full;
    }
    let Some(t) = ctx.tracked.lock().expect("not poisoned").clone() else { return Base::Tracked };
    if t.init_pid != init_pid || Some(t.started) != start_time(init_pid) || t.depth >= ctx.service.full_every {
        return Base::Tracked;
    }
    match ctx.store.get(&t.checkpoint).ok().flatten().and_then(|c| c.checkpoint()) {
        Some(parent) => Base::Parent { parent: Box::new(parent), depth: t.depth + 1 },
        None => Base::Tracked,
    }
}

/// Called before CRIU runs with `track_mem` (a dump or a pre-dump): whatever it leaves, the
/// soft-dirty bits are no longer relative to the last checkpoint.
pub fn forget(ctx: &Job) {
    *ctx.tracked.lock().expect("not poisoned") = None;
}

/// Called once a tracked dump of `init_pid` became checkpoint `id`.
pub fn remember(ctx: &Job, init_pid: i32, id: &str, depth: u32) {
    let Some(started) = start_time(init_pid) else { return };
    *ctx.tracked.lock().expect("not poisoned") = Some(Tracked { init_pid, started, checkpoint: id.to_string(), depth });
}

/// When the process started (clock ticks after boot): with its pid, what tells it from a later
/// process that reused the pid.
fn start_time(pid: i32) -> Option<u64> {
    procfs::process::Process::new(pid).ok()?.stat().ok().map(|s| s.starttime)
}
