//! The on-disk shape of a service file. Unknown keys are errors at every level.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every key a service file may have, for the unknown-key check that reports all of them at once.
pub const TOP_LEVEL_KEYS: &[&str] = &[
    "command",
    "user",
    "group",
    "kill_port",
    "working_dir",
    "environment",
    "criu",
    "stop_timeout_secs",
    "restore_stale",
    "stop_pre_copy",
    "keep_checkpoints",
    "on_incompatible",
    "on_file_changed",
    "dump_timeout",
    "restore_timeout",
    "kill_port_users",
    "log_max_bytes",
    "log_keep",
    "ready",
    "ready_timeout",
    "checkpoint_every",
    "full_every",
    "max_freeze_ms",
    "min_free_bytes",
    "restart",
    "restart_from",
    "restart_backoff",
    "restart_limit",
    "compression",
    "encryption_key_file",
    "allow_root",
    "restore",
];
pub const CRIU_KEYS: &[&str] = &["config", "options"];

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// argv of the service; the first element is looked up in the service's PATH.
    pub command: Vec<String>,
    /// The user the service runs as (never root by accident: it is required).
    pub user: String,
    /// Defaults to the user's primary group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Loopback TCP port whose connections checkpoint the service and stop it.
    pub kill_port: u16,
    /// Defaults to `/`, as systemd does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Added to (and overriding) the clean default environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "CriuSection::is_default")]
    pub criu: CriuSection,
    /// Grace period between SIGTERM and SIGKILL when a service is stopped without a checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_timeout_secs: Option<u64>,
    /// Restore a checkpoint even if the service ran after it was taken (older memory beats none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_stale: Option<bool>,
    /// Whether a stop pre-copies the memory while the service runs (kernels with soft-dirty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_pre_copy: Option<bool>,
    /// How many good checkpoints to keep; older ones are deleted after each new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<u64>,
    /// `cold` or `fail`: what start does when the checkpoint does not fit the program on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_incompatible: Option<String>,
    /// `restore` or `refuse`: what start does when a file the service writes changed since the checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_file_changed: Option<String>,
    /// How long a dump may take before it is ended and the service resumed: `90s`, `10m`, `1h`, or seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump_timeout: Option<serde_yaml::Value>,
    /// How long a restore may take before it is ended, the checkpoint quarantined and the service cold-started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_timeout: Option<serde_yaml::Value>,
    /// Users besides root and the service user who may stop the service through its kill port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kill_port_users: Vec<String>,
    /// service.log is rotated when it would grow past this many bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_max_bytes: Option<u64>,
    /// How many rotated logs (service.log.1 ...) are kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_keep: Option<u64>,
    /// When the service counts as started: `{tcp: "HOST:PORT"}` or `{exec: [cmd...]}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<serde_yaml::Value>,
    /// How long `ready` may take (default 60s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_timeout: Option<serde_yaml::Value>,
    /// Take a checkpoint this often while the service runs (`15m`); none without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<serde_yaml::Value>,
    /// With incremental dumps, a chain longer than this gets a full dump (default 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_every: Option<u64>,
    /// A checkpoint that freezes the service longer than this is warned about (log, metrics).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_freeze_ms: Option<u64>,
    /// A periodic checkpoint is skipped unless this much space would be left after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_free_bytes: Option<u64>,
    /// `no`, `on-failure` or `always`: whether the supervisor brings back a service that exits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart: Option<serde_yaml::Value>,
    /// `cold` or `checkpoint`: what a restart brings back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_from: Option<String>,
    /// The first restart's delay, doubled after each one up to 60s (`1s`, `500ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_backoff: Option<serde_yaml::Value>,
    /// `5 in 10m`: past this many restarts in that window the supervisor gives up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_limit: Option<String>,
    /// `zstd`, or `{zstd: LEVEL}`: store checkpoints' memory pages compressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<serde_yaml::Value>,
    /// A root-only file holding a 32-byte key: checkpoints' images are stored encrypted with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key_file: Option<String>,
    /// Lets `user`/`group` be root (uid or gid 0); without it such a service is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_root: Option<bool>,
    /// `full` or `lazy`: whether a restore copies every page before the service resumes, or
    /// the service resumes at once and its memory comes in on demand (default: the host's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CriuSection {
    /// Name of an option file `<criu-config-dir>/<name>.conf`; default `default`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Extra CRIU command-line options, appended after the option file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl CriuSection {
    fn is_default(&self) -> bool {
        self.config.is_none() && self.options.is_empty()
    }
}
