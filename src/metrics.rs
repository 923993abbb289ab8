//! Prometheus text exposition of every service of the host (`stasis metrics`, and the
//! `metrics_file` of the host config, rewritten atomically by the supervisors for
//! node_exporter's textfile collector).

use crate::paths::Dirs;
use crate::store::{counters, CheckpointStore};
use crate::supervisor::{lock, status::StatusRecord};
use std::fmt::Write;
use std::time::SystemTime;

/// One sample: a metric name, the service it is about, its value.
struct Sample {
    service: String,
    value: f64,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<Sample>,
}

/// Label values are quoted; backslash, quote and newline are escaped as the format says.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(dirs: &Dirs) -> String {
    let mut families = vec![
        Family {
            name: "stasis_up",
            kind: "gauge",
            help: "Whether the service runs under its supervisor (1) or not (0).",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_age_seconds",
            kind: "gauge",
            help: "Age of the newest good checkpoint.",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_fresh",
            kind: "gauge",
            help: "Whether the newest checkpoint is fresh (the next start restores it).",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_bytes",
            kind: "gauge",
            help: "Size of the newest good checkpoint.",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_freeze_seconds",
            kind: "gauge",
            help: "How long the service was frozen for the newest checkpoint.",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_dump_seconds",
            kind: "gauge",
            help: "Duration of the dump of the newest checkpoint.",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_fsync_seconds",
            kind: "gauge",
            help: "Time to make the newest checkpoint durable.",
            samples: vec![],
        },
        Family {
            name: "stasis_checkpoint_restore_seconds",
            kind: "gauge",
            help: "Duration of the last restore of the newest checkpoint.",
            samples: vec![],
        },
        Family { name: "stasis_checkpoints", kind: "gauge", help: "Checkpoints kept.", samples: vec![] },
        Family {
            name: "stasis_restores_total",
            kind: "counter",
            help: "Starts that restored a checkpoint.",
            samples: vec![],
        },
        Family {
            name: "stasis_cold_starts_total",
            kind: "counter",
            help: "Starts that cold-launched the service.",
            samples: vec![],
        },
        Family {
            name: "stasis_restore_fallbacks_total",
            kind: "counter",
            help: "Starts that did not restore the newest checkpoint (stale, damaged, incompatible, failed).",
            samples: vec![],
        },
        Family { name: "stasis_checkpoints_total", kind: "counter", help: "Checkpoints taken.", samples: vec![] },
        Family {
            name: "stasis_checkpoint_failures_total",
            kind: "counter",
            help: "Checkpoints that failed.",
            samples: vec![],
        },
        Family {
            name: "stasis_periodic_checkpoints_skipped_total",
            kind: "counter",
            help: "Periodic checkpoints skipped for lack of disk space (min_free_bytes).",
            samples: vec![],
        },
        Family {
            name: "stasis_freeze_over_budget_total",
            kind: "counter",
            help: "Checkpoints that froze the service longer than max_freeze_ms.",
            samples: vec![],
        },
        Family {
            name: "stasis_restarts_total",
            kind: "counter",
            help: "Times the supervisor brought the service back after it exited (restart).",
            samples: vec![],
        },
    ];
    let mut names = dirs.services_with_state();
    names.sort();
    let now = SystemTime::now();
    for name in names {
        let paths = dirs.service(&name);
        let mut put = |i: usize, value: f64| families[i].samples.push(Sample { service: name.clone(), value });
        let up = lock::holder(&paths.lock).is_some() && StatusRecord::read(&paths).is_some_and(|r| r.state.is_up());
        put(0, f64::from(u8::from(up)));
        let store = CheckpointStore::new(&paths);
        let listed = store.list().unwrap_or_default();
        if let Some(cp) = listed.iter().rev().find_map(|c| c.checkpoint()) {
            let m = &cp.manifest;
            if let Some(t) = crate::time_fmt::parse_rfc3339_utc(&m.created_at) {
                put(1, now.duration_since(t).map(|d| d.as_secs_f64()).unwrap_or(0.0));
            }
            let fresh = store.generations().freshness(m.generation, m.kind) == crate::store::Freshness::Fresh;
            put(2, f64::from(u8::from(fresh)));
            put(3, m.size_bytes as f64);
            let t = m.timings.clone().unwrap_or_default();
            for (i, ms) in [(4, t.freeze_ms), (5, t.dump_ms), (6, t.fsync_ms), (7, t.restore_ms)] {
                if let Some(ms) = ms {
                    put(i, ms as f64 / 1000.0);
                }
            }
        }
        put(8, listed.iter().filter(|c| c.manifest.is_ok()).count() as f64);
        let c = counters::load(&paths.root);
        for (i, v) in [
            (9, c.restores),
            (10, c.cold_starts),
            (11, c.restore_fallbacks),
            (12, c.checkpoints),
            (13, c.checkpoint_failures),
            (14, c.periodic_skipped),
            (15, c.freeze_over_budget),
            (16, c.restarts),
        ] {
            put(i, v as f64);
        }
    }
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for s in &f.samples {
            let _ = writeln!(out, "{}{{service=\"{}\"}} {}", f.name, escape(&s.service), s.value);
        }
    }
    out
}

/// Rewrites the host's `metrics_file`, if one is configured (best effort: metrics never fail a
/// start or a checkpoint).
pub fn write_file(dirs: &Dirs, host: &crate::config::host::HostConfig) {
    if let Some(path) = &host.metrics_file {
        // Atomic for node_exporter's reader; rewritten at every change, so not fsynced.
        let _ = crate::store::durable::write_atomic_with(
            path,
            render(dirs).as_bytes(),
            crate::store::durable::Durability::None,
        );
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let d = tempfile::tempdir().unwrap();
        let dirs = Dirs::new(
            d.path().join("c"),
            d.path().join("s"),
            d.path().join("r"),
            Some(d.path().into()),
            d.path().join("h"),
        );
        std::fs::create_dir_all(d.path().join("s/services/redis")).unwrap();
        counters::bump(&d.path().join("s/services/redis"), |c| c.cold_starts += 2);
        let text = render(&dirs);
        assert!(text.contains("# TYPE stasis_up gauge\nstasis_up{service=\"redis\"} 0\n"), "{text}");
        assert!(
            text.contains("# TYPE stasis_cold_starts_total counter\nstasis_cold_starts_total{service=\"redis\"} 2\n"),
            "{text}"
        );
        assert!(!text.contains("stasis_checkpoint_bytes"), "no checkpoint, no sample: {text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name_labels.ends_with("\"}"), "{line}");
        }
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
