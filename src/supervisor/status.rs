//! `status.json`: what the supervisor last knew about its service, written atomically at every
//! change. It outlives the supervisor, so `status` can say why a service stopped or failed.

use crate::paths::ServicePaths;
use crate::store::durable::{write_atomic_with, Durability};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Running,
    /// Running, and its checkpoint waits for a host dump slot (max_concurrent_dumps).
    Queued,
    /// Running, and being checkpointed.
    Checkpointing,
    Stopped,
    Failed,
    /// The service exited by itself; its supervisor brings it back after a delay (`restart:`).
    Restarting,
}

impl ServiceState {
    /// The service's tree is alive under its supervisor (running, queued or checkpointing).
    pub fn is_up(self) -> bool {
        matches!(self, ServiceState::Running | ServiceState::Queued | ServiceState::Checkpointing)
    }
}

pub use crate::engine::restore::StartedFrom;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusRecord {
    pub name: String,
    pub state: ServiceState,
    /// Host PID of the namespace init while running.
    pub init_pid: Option<i32>,
    pub supervisor_pid: Option<u32>,
    pub started_from: Option<StartedFrom>,
    /// The checkpoint the current (or last) run was restored from.
    pub restored_checkpoint: Option<String>,
    /// Why the last start cold-launched although a checkpoint existed.
    pub fallback_reason: Option<String>,
    /// RFC 3339 time of the last state change.
    pub since: String,
    /// What happened last, in words (exit status, checkpoint taken, start failure).
    pub message: Option<String>,
    /// How long the restore of this run took (null for a cold start).
    #[serde(default)]
    pub restore_ms: Option<u64>,
    /// How often the supervisor has brought the service back after it exited (`restart:`).
    #[serde(default)]
    pub restarts: u32,
    /// From the start of this run until the service first answered its readiness probe
    /// (`ready:`); null without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_answer_ms: Option<u64>,
    /// The transfer of a lazy restore (`restore: lazy`): pages in, left, rate; `complete_ms`
    /// once every page is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy_restore: Option<crate::engine::restore::lazy_start::TransferStatus>,
}

impl StatusRecord {
    pub fn write(&self, paths: &ServicePaths) -> Result<(), crate::store::StoreError> {
        let bytes = serde_json::to_vec_pretty(self).expect("status serializes");
        // Informs (`status`, `list`); a start never trusts it without checking the process.
        write_atomic_with(&paths.status_file(), &bytes, Durability::None)
    }

    pub fn read(paths: &ServicePaths) -> Option<StatusRecord> {
        let bytes = std::fs::read(paths.status_file()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}
