//! What a dump or a start works on: the service, its paths and store, the host's settings, the
//! CRIU binary and the namespace init, resolved once by whoever runs the service.

use crate::config::host::HostConfig;
use crate::config::Service;
use crate::criu::Criu;
use crate::paths::{Dirs, ServicePaths};
use crate::store::identity::HashCache;
use crate::store::CheckpointStore;
use std::path::PathBuf;

pub struct Job {
    pub dirs: Dirs,
    pub host: HostConfig,
    pub service: Service,
    pub paths: ServicePaths,
    pub store: CheckpointStore,
    pub criu: Criu,
    /// The content-addressed namespace init used for cold launches (verified at start).
    pub init_binary: PathBuf,
    /// `uname -r`, recorded in manifests.
    pub kernel_version: String,
    /// Whether the kernel tracks dirty pages for CRIU (soft-dirty), see [`Job::dirty_tracking`].
    pub dirty: std::sync::OnceLock<bool>,
    /// The last tracked dump of the running tree (engine::dump::incremental).
    pub tracked: std::sync::Mutex<Option<crate::engine::dump::incremental::Tracked>>,
}

/// How long `criu check` may take to say whether the kernel tracks dirty pages.
const DIRTY_CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Job {
    /// Whether the kernel tracks dirty pages for CRIU (incremental dumps, pre-copy stops):
    /// asked once per supervisor, and once per CRIU binary and boot on the host.
    pub fn dirty_tracking(&self) -> bool {
        *self.dirty.get_or_init(|| {
            let cache = self.dirs.criu_version_cache().with_file_name("criu-dirty-track.json");
            self.criu.tracks_dirty_memory(&cache, DIRTY_CHECK_LIMIT)
        })
    }

    pub fn hash_cache(&self) -> HashCache {
        HashCache::load(self.dirs.hash_cache())
    }
}
