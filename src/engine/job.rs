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
    /// Whether the kernel tracks dirty pages for CRIU (soft-dirty), asked once.
    pub dirty_tracking: bool,
    /// The last tracked dump of the running tree (engine::dump::incremental).
    pub tracked: std::sync::Mutex<Option<crate::engine::dump::incremental::Tracked>>,
}

impl Job {
    pub fn hash_cache(&self) -> HashCache {
        HashCache::load(self.dirs.hash_cache())
    }
}
