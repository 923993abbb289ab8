//! `stasis checkpoints NAME --delete ID` and `--prune KEEP`: deleting checkpoints by hand,
//! safely. The service's lock is held throughout, so no supervisor can dump, restore or run
//! retention meanwhile. The only fresh checkpoint and the last good one are deleted only with
//! --force. A checkpoint that is the parent of another (an incremental one) is never deleted by
//! hand, and `--prune` keeps the parents of the checkpoints it keeps. Each deleted checkpoint's network-lock table is released first (it would otherwise
//! hold the connections it saved for good), then the checkpoint is taken out of the store.

use super::exit_codes;
use super::output::print_json;
use super::verb_error::VerbError;
use crate::config::{load_named, Service};
use crate::criu::network_lock;
use crate::paths::Dirs;
use crate::store::{CheckpointStore, Freshness, ListedCheckpoint};
use crate::supervisor::lock::{self, Acquired, ServiceLock};
use serde::Serialize;

/// What to delete.
pub enum Doomed<'a> {
    One { id: &'a str },
    KeepNewest(usize),
}

#[derive(Serialize)]
struct Deleted {
    id: String,
    path: String,
    quarantined: bool,
    /// The network-lock table released with it, if it held one.
    network_lock: Option<String>,
}

pub fn run(dirs: &Dirs, name: &str, what: Doomed, force: bool, json: bool) -> Result<i32, VerbError> {
    super::require_root()?;
    let service = load_named(dirs, name).map_err(super::error::Error::from)?;
    let _lock = hold_lock(dirs, &service)?;
    let store = CheckpointStore::new(&dirs.service(&service.name));
    let deleted = match what {
        Doomed::One { id } => vec![delete_one(dirs, &service, &store, id, force)?],
        Doomed::KeepNewest(keep) => prune(dirs, &service, &store, keep, force)?,
    };
    store.purge_removed();
    if json {
        print_json(&serde_json::json!({ "name": service.name, "deleted": deleted }));
        return Ok(exit_codes::OK);
    }
    if deleted.is_empty() {
        println!("nothing to delete: {} has no more checkpoints than that", service.name);
    }
    for d in &deleted {
        let what = if d.quarantined { "quarantined checkpoint" } else { "checkpoint" };
        match &d.network_lock {
            Some(t) => println!("deleted {what} {} (and its network-lock table inet {t})", d.id),
            None => println!("deleted {what} {}", d.id),
        }
    }
    Ok(exit_codes::OK)
}

/// The service's lock: no supervisor runs (and none can start) while checkpoints are deleted.
pub fn hold_lock(dirs: &Dirs, service: &Service) -> Result<ServiceLock, VerbError> {
    let path = dirs.service(&service.name).lock;
    match lock::acquire(&path).map_err(|source| VerbError::Lock { path: path.clone(), source })? {
        Acquired::Yes(l) => Ok(l),
        Acquired::HeldBy(pid) => Err(VerbError::Running { service: service.name.clone(), pid }),
    }
}

fn delete_one(
    dirs: &Dirs,
    service: &Service,
    store: &CheckpointStore,
    id: &str,
    force: bool,
) -> Result<Deleted, VerbError> {
    let all = store.list()?;
    let Some(target) = all.iter().find(|c| c.id == id) else {
        let q = store.find_quarantined(id).ok_or_else(|| VerbError::NoSuchCheckpoint {
            service: service.name.clone(),
            id: id.to_string(),
            dir: store.dir().to_path_buf(),
        })?;
        // Quarantined: never restored by `start`, so no freshness to protect.
        let table = release(dirs, &q.dir);
        std::fs::remove_dir_all(&q.dir).map_err(|e| super::error::Error::io("remove", &q.dir, e))?;
        return Ok(Deleted { id: q.name, path: q.dir.display().to_string(), quarantined: true, network_lock: table });
    };
    // Even with --force: the child would be left without the pages it does not hold.
    if let Some(child) = crate::store::chain::children_of(&all, id).first() {
        return Err(VerbError::Parent { service: service.name.clone(), id: id.to_string(), child: child.id.clone() });
    }
    if !force {
        refuse_unsafe(service, store, &all, std::slice::from_ref(target))?;
    }
    remove(dirs, store, target)
}

/// Keeps the `keep` newest good checkpoints; older directories (damaged ones too) go.
fn prune(
    dirs: &Dirs,
    service: &Service,
    store: &CheckpointStore,
    keep: usize,
    force: bool,
) -> Result<Vec<Deleted>, VerbError> {
    let all = store.list()?;
    let good: Vec<usize> = all.iter().enumerate().filter(|(_, c)| c.manifest.is_ok()).map(|(i, _)| i).collect();
    let first_kept = match good.len().checked_sub(keep) {
        None => return Ok(Vec::new()),
        // Nothing good kept (KEEP 0): everything goes.
        Some(_) if keep == 0 => all.len(),
        Some(n) => good[n],
    };
    // The parents a kept incremental checkpoint needs stay with it.
    let kept: Vec<&ListedCheckpoint> = all[first_kept..].iter().collect();
    let pinned = crate::store::chain::pinned_by(&all, &kept);
    let doomed: Vec<ListedCheckpoint> = all[..first_kept].iter().filter(|c| !pinned.contains(&c.id)).cloned().collect();
    if !force {
        refuse_unsafe(service, store, &all, &doomed)?;
    }
    doomed.iter().map(|c| remove(dirs, store, c)).collect()
}

/// Refuses to delete the only fresh checkpoint, or every good one.
fn refuse_unsafe(
    service: &Service,
    store: &CheckpointStore,
    all: &[ListedCheckpoint],
    doomed: &[ListedCheckpoint],
) -> Result<(), VerbError> {
    let generations = store.generations();
    let gone = |c: &ListedCheckpoint| doomed.iter().any(|d| d.id == c.id);
    let fresh = |c: &&ListedCheckpoint| {
        c.manifest.as_ref().is_ok_and(|m| generations.freshness(m.generation, m.kind) == Freshness::Fresh)
    };
    let fresh_left = all.iter().filter(fresh).any(|c| !gone(c));
    if let Some(f) = all.iter().filter(fresh).find(|c| gone(c)) {
        if !fresh_left {
            return Err(VerbError::OnlyFresh { service: service.name.clone(), id: f.id.clone() });
        }
    }
    let good_left = all.iter().any(|c| c.manifest.is_ok() && !gone(c));
    if let Some(g) = doomed.iter().rev().find(|c| c.manifest.is_ok()) {
        if !good_left {
            return Err(VerbError::LastGood { service: service.name.clone(), id: g.id.clone() });
        }
    }
    Ok(())
}

fn remove(dirs: &Dirs, store: &CheckpointStore, c: &ListedCheckpoint) -> Result<Deleted, VerbError> {
    let table = release(dirs, &c.dir);
    store.remove(c)?;
    Ok(Deleted { id: c.id.clone(), path: c.dir.display().to_string(), quarantined: false, network_lock: table })
}

/// Releases the network-lock table of the checkpoint in `dir` (it will never be restored) and
/// forgets its owner record; returns the table's name if it still held one.
fn release(dirs: &Dirs, dir: &std::path::Path) -> Option<String> {
    match network_lock::end(&dirs.state_dir, dir, network_lock::LockEnd::NeverRestored) {
        Ok(table) => table,
        Err(t) => {
            eprintln!(
                "stasis: warning: failed to delete the network-lock table inet {t} of {}; `stasis gc --yes` deletes it later",
                dir.display()
            );
            None
        }
    }
}
