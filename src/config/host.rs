//! The host's own settings, shared by every supervisor: `/etc/stasis/stasis.yaml` (or
//! `--host-config` / `STASIS_HOST_CONFIG`). A missing file means the defaults.
//!
//! ```yaml
//! max_concurrent_dumps: 1      # default: half the CPUs, at least 1
//! max_concurrent_restores: 32  # default: 16 per CPU
//! metrics_file: /var/lib/prometheus/node-exporter/stasis.prom   # optional
//! warm_criu: auto              # auto (default), on or off: see criu::standby
//! restore: {mode: lazy, lazy_above: 1GiB}   # default: {mode: full}; a service's `restore:` wins
//! # restore: {verify_first_below: 64MiB}: see RestoreDefault
//! ```

use super::error::{ConfigError, Problem};
use super::key_lines::line_of;
use serde::Deserialize;
use std::path::Path;

pub const DEFAULT_HOST_CONFIG: &str = "/etc/stasis/stasis.yaml";
const MAX_SLOTS: u64 = 1024;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostFile {
    max_concurrent_dumps: Option<u64>,
    max_concurrent_restores: Option<u64>,
    metrics_file: Option<std::path::PathBuf>,
    warm_criu: Option<WarmCriu>,
    restore: Option<RestoreFile>,
}

/// Whether a supervisor keeps a CRIU started ahead of its next dump (criu::standby): about 20 ms
/// off every stop where CRIU cannot cache its probes of the kernel, for an idle criu process
/// (about 8 MiB) per running service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WarmCriu {
    /// Where /run is not a tmpfs (CRIU keeps no cache of its probes there).
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestoreFile {
    mode: Option<String>,
    lazy_above: Option<serde_yaml::Value>,
    verify_first_below: Option<serde_yaml::Value>,
}

/// The host's default for services whose file has no `restore:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreDefault {
    pub mode: super::RestoreMode,
    /// With `mode: lazy`, only checkpoints of at least this many bytes are restored lazily
    /// (below it a full restore is as fast and has no page server to lose).
    pub lazy_above: u64,
    /// A plain (not compressed, not sealed) checkpoint of fewer bytes is verified in a pass
    /// before CRIU reads it, while CRIU starts (a few milliseconds, hidden behind its start-up);
    /// a bigger one is checked as CRIU reads it (criu::streamer), which costs CRIU's reading
    /// a little but waits for no pass of its own.
    pub verify_first_below: u64,
}

/// Below it, hashing the images (about 3 GB/s here) takes less than CRIU's start-up (20-30 ms),
/// and serving them costs CRIU about 0.8 ms per MiB it reads.
pub const VERIFY_FIRST_BELOW: u64 = 64 << 20;

impl RestoreDefault {
    /// How a checkpoint of `size` bytes of a service that says `service` is restored.
    pub fn mode_for(&self, service: Option<super::RestoreMode>, size: u64) -> super::RestoreMode {
        use super::RestoreMode::{Full, Lazy};
        match (service, self.mode) {
            (Some(m), _) => m,
            (None, Lazy) if size >= self.lazy_above => Lazy,
            (None, _) => Full,
        }
    }
}

impl Default for RestoreDefault {
    fn default() -> Self {
        RestoreDefault { mode: super::RestoreMode::Full, lazy_above: 0, verify_first_below: VERIFY_FIRST_BELOW }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Dumps that may run at once across every supervisor of the host.
    pub max_concurrent_dumps: usize,
    /// Restores that may run at once.
    pub max_concurrent_restores: usize,
    /// Where the supervisors keep `stasis metrics` up to date (node_exporter's textfile collector).
    pub metrics_file: Option<std::path::PathBuf>,
    pub warm_criu: WarmCriu,
    /// `restore:`: how services that do not say are restored.
    pub restore: RestoreDefault,
}

fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

impl Default for HostConfig {
    /// Dumps are CPU- and disk-bound and slow each other down past a core or so each; restores
    /// mostly map memory and run well side by side.
    fn default() -> Self {
        HostConfig {
            max_concurrent_dumps: (cpus() / 2).max(1),
            max_concurrent_restores: 16 * cpus(),
            metrics_file: None,
            warm_criu: WarmCriu::Auto,
            restore: RestoreDefault::default(),
        }
    }
}

impl HostConfig {
    pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
        let read = match super::trust::read_file(path) {
            Ok(r) => r,
            Err(e) if e.is_not_found() => return Ok(HostConfig::default()),
            Err(e) => return Err(ConfigError::Untrusted(e)),
        };
        let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
        // It sets where every supervisor writes its metrics, as root: only root may say.
        if !read.untrusted.is_empty() {
            return Err(invalid(
                read.untrusted
                    .iter()
                    .map(|e| Problem { line: None, key: String::new(), message: e.to_string() })
                    .collect(),
            ));
        }
        let text = read.text;
        let file: HostFile = if text.trim().is_empty() {
            HostFile::default()
        } else {
            serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text)).map_err(|e| {
                let key = e.path().to_string();
                let line = e.inner().location().map(|l| l.line()).or_else(|| line_of(&text, &[key.as_str()]));
                invalid(vec![Problem {
                    line,
                    key: if key == "." { String::new() } else { key },
                    message: format!(
                        "{} (known keys: max_concurrent_dumps, max_concurrent_restores, metrics_file, restore (mode, lazy_above, verify_first_below), warm_criu: auto, on or off)",
                        e.inner().to_string().split(" at line ").next().unwrap_or_default()
                    ),
                }])
            })?
        };
        let d = HostConfig::default();
        let mut problems = Vec::new();
        let mut slots = |key: &str, v: Option<u64>, default: usize| match v {
            None => default,
            Some(n) if (1..=MAX_SLOTS).contains(&n) => n as usize,
            Some(n) => {
                problems.push(Problem {
                    line: line_of(&text, &[key]),
                    key: key.to_string(),
                    message: format!("{n} is out of range; use 1 to {MAX_SLOTS} (default {default} on this host)"),
                });
                default
            }
        };
        let config = HostConfig {
            max_concurrent_dumps: slots("max_concurrent_dumps", file.max_concurrent_dumps, d.max_concurrent_dumps),
            max_concurrent_restores: slots(
                "max_concurrent_restores",
                file.max_concurrent_restores,
                d.max_concurrent_restores,
            ),
            metrics_file: file.metrics_file.clone(),
            warm_criu: file.warm_criu.unwrap_or_default(),
            restore: restore_default(&text, file.restore.as_ref(), &mut problems),
        };
        if let Some(p) = &file.metrics_file {
            if !p.is_absolute() {
                problems.push(Problem {
                    line: line_of(&text, &["metrics_file"]),
                    key: "metrics_file".into(),
                    message: format!(
                        "{} must be an absolute path (e.g. /var/lib/prometheus/node-exporter/stasis.prom)",
                        p.display()
                    ),
                });
            }
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(invalid(problems))
        }
    }
}

/// `restore: {mode: full|lazy, lazy_above: SIZE}`.
fn restore_default(text: &str, r: Option<&RestoreFile>, problems: &mut Vec<Problem>) -> RestoreDefault {
    let mut out = RestoreDefault::default();
    let Some(r) = r else { return out };
    let mut fail = |key: &str, message: String| {
        problems.push(Problem { line: line_of(text, &["restore", key]), key: format!("restore.{key}"), message })
    };
    match r.mode.as_deref() {
        None | Some("full") => {}
        Some("lazy") => out.mode = super::RestoreMode::Lazy,
        Some(other) => fail("mode", format!("\"{other}\" is not a choice; use `full` or `lazy`")),
    }
    for (key, value, into) in [
        ("lazy_above", &r.lazy_above, &mut out.lazy_above),
        ("verify_first_below", &r.verify_first_below, &mut out.verify_first_below),
    ] {
        if let Some(v) = value {
            match size(v) {
                Some(n) => *into = n,
                None => {
                    fail(key, format!("{} is not a size; write e.g. `1GiB`, `512MiB` or a number of bytes", shown(v)))
                }
            }
        }
    }
    out
}

/// A number of bytes, or a number with a binary unit (`KiB`, `MiB`, `GiB`, `TiB`).
fn size(v: &serde_yaml::Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let s = v.as_str()?.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

fn shown(v: &serde_yaml::Value) -> String {
    serde_yaml::to_string(v).unwrap_or_default().trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_limits_and_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stasis.yaml");
        assert_eq!(HostConfig::load(&p).unwrap(), HostConfig::default());
        assert!(HostConfig::default().max_concurrent_dumps >= 1);
        std::fs::write(&p, "max_concurrent_dumps: 3\n").unwrap();
        assert_eq!(HostConfig::load(&p).unwrap().max_concurrent_dumps, 3);
        std::fs::write(&p, "max_concurrent_dumps: 0\n").unwrap();
        let e = HostConfig::load(&p).unwrap_err().problems();
        assert_eq!((e[0].key.as_str(), e[0].line), ("max_concurrent_dumps", Some(1)));
        std::fs::write(&p, "max_concurent_dumps: 2\n").unwrap();
        let e = HostConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("max_concurent_dumps") && e.contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn the_restore_default_and_its_threshold() {
        use crate::config::RestoreMode::{Full, Lazy};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("stasis.yaml");
        std::fs::write(&p, "restore: {mode: lazy, lazy_above: 1GiB}\n").unwrap();
        let r = HostConfig::load(&p).unwrap().restore;
        assert_eq!(r, RestoreDefault { mode: Lazy, lazy_above: 1 << 30, verify_first_below: VERIFY_FIRST_BELOW });
        assert_eq!(r.mode_for(None, 1 << 30), Lazy);
        assert_eq!(r.mode_for(None, (1 << 30) - 1), Full, "below the threshold");
        assert_eq!(r.mode_for(Some(Full), 8 << 30), Full, "the service's word wins");
        assert_eq!(RestoreDefault::default().mode_for(Some(Lazy), 1), Lazy);
        assert_eq!(RestoreDefault::default().mode_for(None, 1 << 40), Full);
        std::fs::write(&p, "restore: {mode: sometimes, lazy_above: big}\n").unwrap();
        let e = HostConfig::load(&p).unwrap_err().problems();
        let keys: Vec<&str> = e.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["restore.mode", "restore.lazy_above"]);
        std::fs::write(&p, "restore: {mode: lazy, above: 1}\n").unwrap();
        assert!(HostConfig::load(&p).is_err(), "unknown keys are errors");
        std::fs::write(&p, "restore: {verify_first_below: 1MiB}\n").unwrap();
        assert_eq!(HostConfig::load(&p).unwrap().restore.verify_first_below, 1 << 20);
        std::fs::write(&p, "restore: {verify_first_below: small}\n").unwrap();
        let e = HostConfig::load(&p).unwrap_err().problems();
        assert_eq!(e[0].key, "restore.verify_first_below");
    }
}
