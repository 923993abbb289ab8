//! `stop --all` and `start --all`: every configured service at once (stop: those running,
//! start: those not running), for reboot scripts and ops tooling without systemd. Each service
//! runs in its own thread, so one slow or failing service never holds the others back; the
//! host-wide slots decide how many dumps and restores really run at once. A progress bar on a
//! terminal, a line per service as it finishes, a summary, and `--json`.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use super::start::start_one;
use super::stop::{stop_one, StopOutcome};
use crate::config::{discover, load_service, service_name_from_path, Service};
use crate::paths::Dirs;
use crate::supervisor::lock;
use crate::time_fmt::human_bytes;
use serde::Serialize;
use std::io::IsTerminal;
use std::time::Instant;

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    ok: bool,
    checkpoint: Option<String>,
    bytes: Option<u64>,
    seconds: f64,
    error: Option<String>,
    /// start only: checkpoint or cold.
    #[serde(skip_serializing_if = "Option::is_none")]
    started_from: Option<crate::supervisor::status::StartedFrom>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fallback_reason: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Stop,
    Start,
}

/// Every service file, loaded; a file that does not load is a failed row of its own.
fn services(dirs: &Dirs) -> Result<(Vec<Service>, Vec<Row>), Error> {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for path in discover(dirs)? {
        let name = service_name_from_path(&path).unwrap_or_else(|_| path.display().to_string());
        match load_service(dirs, &path.display().to_string()) {
            Ok(s) => ok.push(s),
            Err(e) => bad.push(Row {
                name,
                ok: false,
                checkpoint: None,
                bytes: None,
                seconds: 0.0,
                error: Some(e.to_string()),
                started_from: None,
                fallback_reason: None,
            }),
        }
    }
    Ok((ok, bad))
}

pub fn stop_all(dirs: &Dirs, json: bool) -> Result<i32, Error> {
    run_all(dirs, Verb::Stop, json)
}

pub fn start_all(dirs: &Dirs, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    crate::criu::Criu::get_cached(&dirs.criu_version_cache())?;
    run_all(dirs, Verb::Start, json)
}

fn run_all(dirs: &Dirs, verb: Verb, json: bool) -> Result<i32, Error> {
    let (all, mut rows) = services(dirs)?;
    let running = |s: &Service| lock::holder(&dirs.service(&s.name).lock).is_some();
    let todo: Vec<Service> = all.into_iter().filter(|s| running(s) == (verb == Verb::Stop)).collect();
    let bar = (!json && std::io::stderr().is_terminal() && !todo.is_empty()).then(|| {
        let bar = indicatif::ProgressBar::new(todo.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(if verb == Verb::Stop { "checkpointing" } else { "starting" });
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        bar
    });
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => println!("{line}"),
    };
    if !json {
        for r in &rows {
            say(format!("{:<20} ERROR {}", r.name, crate::text::escape_lines(r.error.as_deref().unwrap_or(""))));
        }
    }
    let (tx, rx) = std::sync::mpsc::channel::<Row>();
    let total = todo.len();
    std::thread::scope(|scope| {
        for service in todo {
            let tx = tx.clone();
            scope.spawn(move || {
                let _ = tx.send(one(dirs, &service, verb));
            });
        }
        drop(tx);
        for row in rx.iter() {
            if let Some(b) = &bar {
                b.inc(1);
            }
            if !json {
                say(line(&row, verb));
            }
            rows.push(row);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let failed: Vec<&str> = rows.iter().filter(|r| !r.ok).map(|r| r.name.as_str()).collect();
    let code = if failed.is_empty() {
        exit_codes::OK
    } else if verb == Verb::Stop {
        exit_codes::CHECKPOINT_FAILED
    } else {
        exit_codes::START_FAILED
    };
    if json {
        print_json(&serde_json::json!({ "services": rows }));
    } else {
        let done = if verb == Verb::Stop { "checkpointed and stopped" } else { "started" };
        let good = rows.len() - failed.len();
        if total == 0 && failed.is_empty() {
            println!(
                "nothing to do: {}",
                if verb == Verb::Stop { "no service is running" } else { "every service is running" }
            );
        } else {
            println!("{done} {good} of {} services", rows.len());
        }
        if !failed.is_empty() {
            eprintln!("stasis: error: failed: {}", failed.join(", "));
        }
    }
    Ok(code)
}

fn one(dirs: &Dirs, service: &Service, verb: Verb) -> Row {
    let t0 = Instant::now();
    let mut row = Row {
        name: service.name.clone(),
        ok: false,
        checkpoint: None,
        bytes: None,
        seconds: 0.0,
        error: None,
        started_from: None,
        fallback_reason: None,
    };
    match verb {
        Verb::Stop => match stop_one(dirs, service, false) {
            Ok(StopOutcome::Checkpointed { id, .. }) => {
                row.ok = true;
                row.bytes = id.as_deref().and_then(|id| checkpoint_size(dirs, &service.name, id));
                row.checkpoint = id;
            }
            Ok(StopOutcome::AlreadyStopped) => row.ok = true,
            Ok(StopOutcome::Failed { error, .. }) => row.error = Some(error),
            Err(e) => row.error = Some(e.to_string()),
        },
        Verb::Start => match start_one(dirs, service, None, false, &|_| {}) {
            Ok(r) if r.ok => {
                row.ok = true;
                row.bytes = r.checkpoint.as_deref().and_then(|id| checkpoint_size(dirs, &service.name, id));
                row.started_from = r.started_from;
                row.checkpoint = r.checkpoint;
                row.fallback_reason = r.fallback_reason;
            }
            Ok(r) => row.error = r.error,
            Err(e) => row.error = Some(e.to_string()),
        },
    }
    row.seconds = t0.elapsed().as_secs_f64();
    row
}

fn checkpoint_size(dirs: &Dirs, name: &str, id: &str) -> Option<u64> {
    let path = dirs.service(name).checkpoints().join(id).join("manifest.json");
    let m = crate::store::Manifest::from_sealed_bytes(&std::fs::read(path).ok()?).ok()?;
    Some(m.size_bytes)
}

fn line(r: &Row, verb: Verb) -> String {
    match (&r.error, verb) {
        (Some(e), _) => format!("{:<20} ERROR {e}", r.name),
        (None, Verb::Stop) => format!(
            "{:<20} OK    checkpoint {} {} {:.2} s",
            r.name,
            r.checkpoint.as_deref().unwrap_or("-"),
            r.bytes.map(human_bytes).unwrap_or_default(),
            r.seconds
        ),
        (None, Verb::Start) => {
            let how = match &r.checkpoint {
                Some(id) => format!("restored from checkpoint {id}"),
                None => "cold start".to_string(),
            };
            let warn = r.fallback_reason.as_deref().map(|w| format!(" (warning: {w})")).unwrap_or_default();
            format!("{:<20} OK    {how} {:.2} s{warn}", r.name, r.seconds)
        }
    }
}
