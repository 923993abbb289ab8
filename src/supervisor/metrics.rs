//! Prometheus text exposition of every service of the host (`stasis metrics`, and the
//! `metrics_file` of the host config, rewritten atomically by the supervisors for
//! node_exporter's textfile collector).
//!
//! It is the supervisor's: every figure in it is one the supervisors keep (their locks, status
//! records, counters and checkpoints), and they rewrite the file at every change; the CLI, above,
//! only prints what this renders. It is not split into a reader here and a renderer lower down:
//! the table of families names the very figures the reading gathers, and nothing else renders them.

use super::{lock, status::StatusRecord};
use crate::paths::{Dirs, ServicePaths};
use crate::store::counters::{self, Counters};
use crate::store::{CheckpointStore, Freshness, Manifest, Timings};
use std::fmt::Write;
use std::time::SystemTime;

/// What the exposition says of one service, read once for every family.
struct Reading {
    up: bool,
    newest: Option<Newest>,
    /// Checkpoints whose manifest can be read.
    kept: usize,
    counters: Counters,
    /// The supervisor's last status record, while it runs.
    status: Option<StatusRecord>,
}

/// The newest good checkpoint of a service.
struct Newest {
    /// None when its creation time cannot be read.
    age_seconds: Option<f64>,
    fresh: bool,
    bytes: u64,
    timings: Timings,
}

/// Where a family's figure comes from, which also says its type: what `counters.json` counts is
/// a counter, the rest are gauges.
#[derive(Clone, Copy)]
enum Source {
    Service(fn(&Reading) -> f64),
    /// A service without a checkpoint, or a checkpoint without the figure, has no sample.
    Newest(fn(&Newest) -> Option<f64>),
    Counter(fn(&Counters) -> u64),
    /// Figures of the current run, from the status record of a running supervisor.
    Status(fn(&StatusRecord) -> Option<f64>),
}

impl Source {
    fn value(self, r: &Reading) -> Option<f64> {
        match self {
            Source::Service(f) => Some(f(r)),
            Source::Newest(f) => f(r.newest.as_ref()?),
            Source::Counter(f) => Some(f(&r.counters) as f64),
            Source::Status(f) => f(r.status.as_ref()?),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Source::Counter(_) => "counter",
            Source::Service(_) | Source::Newest(_) | Source::Status(_) => "gauge",
        }
    }
}

/// A family without samples is left out.
struct Family {
    name: &'static str,
    help: &'static str,
    source: Source,
}

const fn service(name: &'static str, help: &'static str, f: fn(&Reading) -> f64) -> Family {
    Family { name, help, source: Source::Service(f) }
}

const fn newest(name: &'static str, help: &'static str, f: fn(&Newest) -> Option<f64>) -> Family {
    Family { name, help, source: Source::Newest(f) }
}

const fn status(name: &'static str, help: &'static str, f: fn(&StatusRecord) -> Option<f64>) -> Family {
    Family { name, help, source: Source::Status(f) }
}

const fn counter(name: &'static str, help: &'static str, f: fn(&Counters) -> u64) -> Family {
    Family { name, help, source: Source::Counter(f) }
}

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

fn seconds(ms: Option<u64>) -> Option<f64> {
    ms.map(|ms| ms as f64 / 1000.0)
}

/// Every family, in the order of the text.
const FAMILIES: [Family; 21] = [
    service("stasis_up", "Whether the service runs under its supervisor (1) or not (0).", |r| flag(r.up)),
    newest("stasis_checkpoint_age_seconds", "Age of the newest good checkpoint.", |n| n.age_seconds),
    newest("stasis_checkpoint_fresh", "Whether the newest checkpoint is fresh (the next start restores it).", |n| {
        Some(flag(n.fresh))
    }),
    newest("stasis_checkpoint_bytes", "Size of the newest good checkpoint.", |n| Some(n.bytes as f64)),
    newest("stasis_checkpoint_freeze_seconds", "How long the service was frozen for the newest checkpoint.", |n| {
        seconds(n.timings.freeze_ms)
    }),
    newest("stasis_checkpoint_dump_seconds", "Duration of the dump of the newest checkpoint.", |n| {
        seconds(n.timings.dump_ms)
    }),
    newest("stasis_checkpoint_fsync_seconds", "Time to make the newest checkpoint durable.", |n| {
        seconds(n.timings.fsync_ms)
    }),
    newest("stasis_checkpoint_restore_seconds", "Duration of the last restore of the newest checkpoint.", |n| {
        seconds(n.timings.restore_ms)
    }),
    status(
        "stasis_restore_first_answer_seconds",
        "From the start of this run to the first answer to its readiness probe (ready).",
        |r| seconds(r.first_answer_ms),
    ),
    status("stasis_lazy_restore_pages_in", "Pages a lazy restore has brought in so far (restore: lazy).", |r| {
        r.lazy_restore.as_ref().map(|t| t.pages_in as f64)
    }),
    status("stasis_lazy_restore_pages_left", "Pages a lazy restore has still to bring in.", |r| {
        r.lazy_restore.as_ref().map(|t| t.pages_left as f64)
    }),
    status("stasis_lazy_restore_complete_seconds", "From the start of a lazy restore until every page was in.", |r| {
        seconds(r.lazy_restore.as_ref()?.complete_ms)
    }),
    service("stasis_checkpoints", "Checkpoints kept.", |r| r.kept as f64),
    counter("stasis_restores_total", "Starts that restored a checkpoint.", |c| c.restores),
    counter("stasis_cold_starts_total", "Starts that cold-launched the service.", |c| c.cold_starts),
    counter(
        "stasis_restore_fallbacks_total",
        "Starts that did not restore the newest checkpoint (stale, damaged, incompatible, failed).",
        |c| c.restore_fallbacks,
    ),
    counter("stasis_checkpoints_total", "Checkpoints taken.", |c| c.checkpoints),
    counter("stasis_checkpoint_failures_total", "Checkpoints that failed.", |c| c.checkpoint_failures),
    counter(
        "stasis_periodic_checkpoints_skipped_total",
        "Periodic checkpoints skipped for lack of disk space (min_free_bytes).",
        |c| c.periodic_skipped,
    ),
    counter("stasis_freeze_over_budget_total", "Checkpoints that froze the service longer than max_freeze_ms.", |c| {
        c.freeze_over_budget
    }),
    counter("stasis_restarts_total", "Times the supervisor brought the service back after it exited (restart).", |c| {
        c.restarts
    }),
];

/// Label values are quoted; backslash, quote and newline are escaped as the format says.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(dirs: &Dirs) -> String {
    let readings = read_services(dirs);
    let mut out = String::new();
    for family in &FAMILIES {
        write_family(&mut out, family, &readings);
    }
    out
}

/// Every service with a state directory, by name.
fn read_services(dirs: &Dirs) -> Vec<(String, Reading)> {
    let mut names = dirs.services_with_state();
    names.sort();
    let now = SystemTime::now();
    names.into_iter().map(|name| (name.clone(), Reading::of(&dirs.service(&name), now))).collect()
}

impl Reading {
    fn of(paths: &ServicePaths, now: SystemTime) -> Reading {
        // A status record outlives its supervisor: up only while the lock is held.
        let status = StatusRecord::read(paths).filter(|_| lock::holder(&paths.lock).is_some());
        let up = status.as_ref().is_some_and(|r| r.state.is_up());
        let store = CheckpointStore::new(paths);
        let listed = store.list().unwrap_or_default();
        let newest = listed.iter().rev().find_map(|c| c.checkpoint()).map(|cp| Newest::of(&store, &cp.manifest, now));
        let kept = listed.iter().filter(|c| c.manifest.is_ok()).count();
        Reading { up, newest, kept, counters: counters::load(&paths.root), status }
    }
}

impl Newest {
    fn of(store: &CheckpointStore, m: &Manifest, now: SystemTime) -> Newest {
        let age_seconds = crate::time_fmt::parse_rfc3339_utc(&m.created_at)
            .map(|t| now.duration_since(t).map(|d| d.as_secs_f64()).unwrap_or(0.0));
        Newest {
            age_seconds,
            fresh: store.generations().freshness(m.generation, m.kind) == Freshness::Fresh,
            bytes: m.size_bytes,
            timings: m.timings.clone().unwrap_or_default(),
        }
    }
}

fn write_family(out: &mut String, f: &Family, readings: &[(String, Reading)]) {
    let samples: Vec<(&str, f64)> =
        readings.iter().filter_map(|(name, r)| Some((name.as_str(), f.source.value(r)?))).collect();
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.source.kind());
    for (service, value) in samples {
        let _ = writeln!(out, "{}{{service=\"{}\"}} {}", f.name, escape(service), value);
    }
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

    fn dirs_in(d: &std::path::Path) -> Dirs {
        Dirs::new(d.join("c"), d.join("s"), d.join("r"), Some(d.into()), d.join("h"))
    }

    #[test]
    fn exposition_format() {
        let d = tempfile::tempdir().unwrap();
        let dirs = dirs_in(d.path());
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

    const PINNED: &str = r#"# HELP stasis_up Whether the service runs under its supervisor (1) or not (0).
# TYPE stasis_up gauge
stasis_up{service="redis"} 1
stasis_up{service="we\"ird\\name"} 0
# HELP stasis_checkpoint_age_seconds Age of the newest good checkpoint.
# TYPE stasis_checkpoint_age_seconds gauge
stasis_checkpoint_age_seconds{service="redis"} AGE
# HELP stasis_checkpoint_fresh Whether the newest checkpoint is fresh (the next start restores it).
# TYPE stasis_checkpoint_fresh gauge
stasis_checkpoint_fresh{service="redis"} 1
# HELP stasis_checkpoint_bytes Size of the newest good checkpoint.
# TYPE stasis_checkpoint_bytes gauge
stasis_checkpoint_bytes{service="redis"} 4096
# HELP stasis_checkpoint_freeze_seconds How long the service was frozen for the newest checkpoint.
# TYPE stasis_checkpoint_freeze_seconds gauge
stasis_checkpoint_freeze_seconds{service="redis"} 0.012
# HELP stasis_checkpoint_dump_seconds Duration of the dump of the newest checkpoint.
# TYPE stasis_checkpoint_dump_seconds gauge
stasis_checkpoint_dump_seconds{service="redis"} 0.345
# HELP stasis_checkpoint_fsync_seconds Time to make the newest checkpoint durable.
# TYPE stasis_checkpoint_fsync_seconds gauge
stasis_checkpoint_fsync_seconds{service="redis"} 0.006
# HELP stasis_checkpoint_restore_seconds Duration of the last restore of the newest checkpoint.
# TYPE stasis_checkpoint_restore_seconds gauge
stasis_checkpoint_restore_seconds{service="redis"} 1.5
# HELP stasis_restore_first_answer_seconds From the start of this run to the first answer to its readiness probe (ready).
# TYPE stasis_restore_first_answer_seconds gauge
stasis_restore_first_answer_seconds{service="redis"} 0.14
# HELP stasis_lazy_restore_pages_in Pages a lazy restore has brought in so far (restore: lazy).
# TYPE stasis_lazy_restore_pages_in gauge
stasis_lazy_restore_pages_in{service="redis"} 262144
# HELP stasis_lazy_restore_pages_left Pages a lazy restore has still to bring in.
# TYPE stasis_lazy_restore_pages_left gauge
stasis_lazy_restore_pages_left{service="redis"} 0
# HELP stasis_lazy_restore_complete_seconds From the start of a lazy restore until every page was in.
# TYPE stasis_lazy_restore_complete_seconds gauge
stasis_lazy_restore_complete_seconds{service="redis"} 2
# HELP stasis_checkpoints Checkpoints kept.
# TYPE stasis_checkpoints gauge
stasis_checkpoints{service="redis"} 1
stasis_checkpoints{service="we\"ird\\name"} 0
# HELP stasis_restores_total Starts that restored a checkpoint.
# TYPE stasis_restores_total counter
stasis_restores_total{service="redis"} 1
stasis_restores_total{service="we\"ird\\name"} 0
# HELP stasis_cold_starts_total Starts that cold-launched the service.
# TYPE stasis_cold_starts_total counter
stasis_cold_starts_total{service="redis"} 2
stasis_cold_starts_total{service="we\"ird\\name"} 0
# HELP stasis_restore_fallbacks_total Starts that did not restore the newest checkpoint (stale, damaged, incompatible, failed).
# TYPE stasis_restore_fallbacks_total counter
stasis_restore_fallbacks_total{service="redis"} 3
stasis_restore_fallbacks_total{service="we\"ird\\name"} 0
# HELP stasis_checkpoints_total Checkpoints taken.
# TYPE stasis_checkpoints_total counter
stasis_checkpoints_total{service="redis"} 4
stasis_checkpoints_total{service="we\"ird\\name"} 0
# HELP stasis_checkpoint_failures_total Checkpoints that failed.
# TYPE stasis_checkpoint_failures_total counter
stasis_checkpoint_failures_total{service="redis"} 5
stasis_checkpoint_failures_total{service="we\"ird\\name"} 0
# HELP stasis_periodic_checkpoints_skipped_total Periodic checkpoints skipped for lack of disk space (min_free_bytes).
# TYPE stasis_periodic_checkpoints_skipped_total counter
stasis_periodic_checkpoints_skipped_total{service="redis"} 6
stasis_periodic_checkpoints_skipped_total{service="we\"ird\\name"} 0
# HELP stasis_freeze_over_budget_total Checkpoints that froze the service longer than max_freeze_ms.
# TYPE stasis_freeze_over_budget_total counter
stasis_freeze_over_budget_total{service="redis"} 7
stasis_freeze_over_budget_total{service="we\"ird\\name"} 0
# HELP stasis_restarts_total Times the supervisor brought the service back after it exited (restart).
# TYPE stasis_restarts_total counter
stasis_restarts_total{service="redis"} 8
stasis_restarts_total{service="we\"ird\\name"} 0
"#;

    /// A service up under its supervisor with one good checkpoint and every counter set, and one
    /// with nothing but a state directory (and a name that needs escaping): the whole text, byte
    /// for byte, save the age, which moves with the clock.
    #[test]
    fn exposition_is_pinned() {
        let d = tempfile::tempdir().unwrap();
        let dirs = dirs_in(d.path());
        let paths = dirs.service("redis");
        std::fs::create_dir_all(&paths.root).unwrap();
        std::fs::create_dir_all(dirs.service("we\"ird\\name").root).unwrap();
        let _held = match lock::acquire(&paths.lock).unwrap() {
            lock::Acquired::Yes(l) => l,
            lock::Acquired::HeldBy(pid) => panic!("held by {pid}"),
        };
        StatusRecord {
            name: "redis".into(),
            state: crate::supervisor::status::ServiceState::Running,
            init_pid: None,
            supervisor_pid: None,
            started_from: None,
            restored_checkpoint: None,
            fallback_reason: None,
            since: "2026-01-01T00:00:00Z".into(),
            message: None,
            restore_ms: None,
            restarts: 0,
            first_answer_ms: Some(140),
            lazy_restore: Some(crate::engine::restore::lazy_start::TransferStatus {
                checkpoint: "c".into(),
                state: crate::engine::restore::lazy_start::TransferState::Complete,
                pages_in: 262144,
                pages_total: 262144,
                pages_left: 0,
                mib_per_s: 512.0,
                complete_ms: Some(2000),
            }),
        }
        .write(&paths)
        .unwrap();
        let store = CheckpointStore::new(&paths);
        let pending = store.begin(store.take_generation().unwrap()).unwrap();
        std::fs::write(pending.images_dir().join("pages-1.img"), b"pages").unwrap();
        pending
            .write_draft(
                &serde_json::from_value(serde_json::json!({
                    "format": crate::store::manifest_format(), "id": pending.id, "generation": 1,
                    "service": "redis", "kind": "stop", "created_at": "2026-01-01T00:00:00Z",
                    "stasis_version": "0", "criu_version": "4.2.1", "kernel_version": "6.18",
                    "config_digest": "c", "init_binary": "/x", "stdout_pipe_inode": 7, "size_bytes": 0,
                    "executables": [],
                }))
                .unwrap(),
            )
            .unwrap();
        let mut cp = pending.finalize().unwrap();
        // The size finalize measures holds the fsync time it took, in digits: pinned instead.
        cp.manifest.size_bytes = 4096;
        cp.record_timings(|t| {
            t.freeze_ms = Some(12);
            t.dump_ms = Some(345);
            t.fsync_ms = Some(6);
            t.restore_ms = Some(1500);
        })
        .unwrap();
        counters::bump(&paths.root, |c| {
            *c = counters::Counters {
                restores: 1,
                cold_starts: 2,
                restore_fallbacks: 3,
                checkpoints: 4,
                checkpoint_failures: 5,
                periodic_skipped: 6,
                freeze_over_budget: 7,
                restarts: 8,
            }
        });
        let text: String = render(&dirs)
            .lines()
            .map(|l| match l.strip_prefix("stasis_checkpoint_age_seconds{service=\"redis\"} ") {
                Some(age) => {
                    assert!(age.parse::<f64>().unwrap() > 0.0, "{l}");
                    "stasis_checkpoint_age_seconds{service=\"redis\"} AGE\n".to_string()
                }
                None => format!("{l}\n"),
            })
            .collect();
        assert_eq!(text, PINNED);
    }
}
