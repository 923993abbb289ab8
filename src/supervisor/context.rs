//! Everything the supervisor's parts need about the service, resolved once at start.

use crate::config::Service;
use crate::criu::Criu;
use crate::paths::ServicePaths;
use crate::store::CheckpointStore;
use std::path::PathBuf;

pub struct Context {
    pub service: Service,
    pub paths: ServicePaths,
    pub store: CheckpointStore,
    pub criu: Criu,
    /// The content-addressed namespace init used for cold launches.
    pub init_binary: PathBuf,
    /// This binary, which CRIU runs as its action script.
    pub exe: PathBuf,
}
