//! The host's own settings, shared by every supervisor: `/etc/stasis/stasis.yaml` (or
//! `--host-config` / `STASIS_HOST_CONFIG`). A missing file means the defaults.
//!
//! ```yaml
//! max_concurrent_dumps: 1      # default: half the CPUs, at least 1
//! max_concurrent_restores: 32  # default: 16 per CPU
//! metrics_file: /var/lib/prometheus/node-exporter/stasis.prom   # optional
//! warm_criu: auto              # auto (default), on or off: see criu::standby
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Dumps that may run at once across every supervisor of the host.
    pub max_concurrent_dumps: usize,
    /// Restores that may run at once.
    pub max_concurrent_restores: usize,
    /// Where the supervisors keep `stasis metrics` up to date (node_exporter's textfile collector).
    pub metrics_file: Option<std::path::PathBuf>,
    pub warm_criu: WarmCriu,
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
                        "{} (known keys: max_concurrent_dumps, max_concurrent_restores, metrics_file, warm_criu: auto, on or off)",
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
}
