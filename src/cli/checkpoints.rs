//! `stasis checkpoints NAME`: the service's checkpoints, oldest first, and the quarantined ones.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::load_named;
use crate::paths::Dirs;
use crate::store::{CheckpointStore, Freshness};
use crate::time_fmt::human_bytes;
use serde::Serialize;

#[derive(Serialize)]
struct Row {
    id: String,
    /// The service's generation counter when it was taken (null for checkpoints of stasis < 0.2).
    generation: Option<u64>,
    path: String,
    valid: bool,
    latest: bool,
    /// The service has not run since it was taken: `start` restores it.
    fresh: bool,
    stale_reason: Option<String>,
    /// Why it does not fit the program on disk, as found by the last start.
    incompatible: Option<String>,
    /// The nftables table (`inet CRIU-...`) holding the TCP connections of this not yet restored
    /// checkpoint, if it exists now.
    network_lock: Option<String>,
    /// freeze_ms, dump_ms, fsync_ms, restore_ms, pages, bytes_written.
    timings: Option<crate::store::Timings>,
    created_at: Option<String>,
    kind: Option<crate::store::DumpKind>,
    size_bytes: Option<u64>,
    problem: Option<String>,
    /// An incremental checkpoint: the checkpoint it holds the changes since (store::chain).
    parent: Option<String>,
    /// A pre-copy stop: its pre-dump is inside it.
    pre_copy: bool,
    /// Why its chain of parents cannot be restored (a parent missing, replaced or with a
    /// damaged manifest), found from the manifests; images are read only by a restore.
    chain_problem: Option<String>,
}

#[derive(Serialize)]
struct Quarantined {
    /// The directory's name under quarantine/ (`ID`, or `ID-N` if that id was quarantined before).
    id: String,
    path: String,
    reason: Option<String>,
    /// Its manifest can be read and checks out (its images are verified only when it is
    /// brought back with `start --from ID --force`).
    valid: bool,
    problem: Option<String>,
}

pub fn run(dirs: &Dirs, name: &str, json: bool) -> Result<i32, Error> {
    // The state directory is root-only: without root every service would look stopped.
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let store = CheckpointStore::new(&dirs.service(&service.name));
    let latest = store.latest()?.map(|c| c.id);
    let generations = store.generations();
    let tables = crate::criu::network_lock::tables().unwrap_or_default();
    let all = store.list()?;
    let rows: Vec<Row> = all
        .clone()
        .into_iter()
        .map(|c| {
            let freshness = c.manifest.as_ref().ok().map(|m| generations.freshness(m.generation, m.kind));
            (c, freshness)
        })
        .map(|(c, freshness)| Row {
            generation: c.generation(),
            fresh: freshness == Some(Freshness::Fresh),
            stale_reason: match freshness {
                Some(Freshness::Stale(why)) => Some(why),
                _ => None,
            },
            incompatible: c.incompatible(),
            timings: c.manifest.as_ref().ok().and_then(|m| m.timings.clone()),
            network_lock: crate::criu::network_lock::table_of_dump(&c.dir.join(crate::criu::DUMP_LOG))
                .filter(|t| tables.contains(t)),
            latest: latest.as_deref() == Some(c.id.as_str()),
            path: c.dir.display().to_string(),
            valid: c.manifest.is_ok(),
            created_at: c.manifest.as_ref().ok().map(|m| m.created_at.clone()),
            kind: c.manifest.as_ref().ok().map(|m| m.kind),
            size_bytes: c.manifest.as_ref().ok().map(|m| m.size_bytes),
            problem: c.manifest.as_ref().err().cloned(),
            parent: c.manifest.as_ref().ok().and_then(|m| m.parent.as_ref()).map(|p| p.id.clone()),
            pre_copy: c.manifest.as_ref().is_ok_and(|m| m.pre_copy.is_some()),
            chain_problem: c
                .checkpoint()
                .and_then(|cp| crate::store::chain::resolve_in(&all, &cp).err())
                .map(|e| e.to_string()),
            id: c.id,
        })
        .collect();
    let quarantined: Vec<Quarantined> = store
        .quarantined()
        .into_iter()
        .map(|q| Quarantined {
            id: q.name,
            path: q.dir.display().to_string(),
            reason: q.reason,
            valid: q.manifest.is_ok(),
            problem: q.manifest.err(),
        })
        .collect();
    if json {
        print_json(&serde_json::json!({
            "name": service.name,
            "generation": generations.last,
            "checkpoints": rows,
            "quarantined": quarantined,
        }));
        return Ok(exit_codes::OK);
    }
    if rows.is_empty() {
        println!("{} has no checkpoints (in {})", service.name, store.dir().display());
    }
    for r in &rows {
        let mark = if r.latest { "*" } else { " " };
        match &r.problem {
            None => {
                let state = if r.fresh { "fresh" } else { "stale" };
                println!(
                    "{mark} {}  {}  {:>10}  {:?}  {state}",
                    r.id,
                    r.created_at.as_deref().unwrap_or("-"),
                    human_bytes(r.size_bytes.unwrap_or(0)),
                    r.kind.expect("valid rows have a kind")
                );
                if let Some(parent) = &r.parent {
                    println!("    incremental: the pages written since {parent}");
                }
                if let Some(why) = &r.chain_problem {
                    println!("    cannot be restored: {}", crate::text::escape_lines(why));
                }
                if let Some(why) = &r.stale_reason {
                    println!("    stale: {}", crate::text::escape_lines(why));
                }
                if let Some(why) = &r.incompatible {
                    println!("    incompatible: {}", crate::text::escape_lines(why));
                }
            }
            Some(p) => println!("! {}  damaged: {}", r.id, crate::text::escape_lines(p)),
        }
    }
    for q in &quarantined {
        println!(
            "quarantined {}: {}",
            q.id,
            crate::text::escape_lines(q.reason.as_deref().unwrap_or("no reason recorded"))
        );
    }
    if let Some(q) = quarantined.iter().rev().find(|q| q.valid) {
        println!(
            "a quarantined checkpoint comes back only after it is verified again: `stasis start {} --from {} --force`",
            service.name, q.id
        );
    }
    Ok(exit_codes::OK)
}
