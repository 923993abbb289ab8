//! `stasis gc`: finds the CRIU network-lock tables (`inet CRIU-...`) that checkpoints of this
//! state dir left on the host and that nothing needs any more (their checkpoint was deleted by
//! hand), lists them, and with `--yes` deletes them. Table names are host-wide: a table is
//! deleted only if this state dir recorded it as its own when the dump took it and that
//! checkpoint is in neither `checkpoints/` nor `quarantine/`. Tables of other state dirs, of
//! dumps from before such records, or of programs other than stasis are listed as not ours
//! and never deleted.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::criu::network_lock::{self, Owner};
use crate::paths::Dirs;
use crate::store::CheckpointStore;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Serialize)]
struct Report {
    /// Tables recorded as this state dir's whose checkpoint is gone.
    orphaned_tables: Vec<String>,
    /// Tables that belong to a checkpoint in the state dir (kept: its restore needs them).
    kept_tables: Vec<String>,
    /// Tables this state dir cannot prove are its own (never deleted), with why.
    not_ours_tables: Vec<NotOurs>,
    deleted: bool,
}

#[derive(Serialize)]
struct NotOurs {
    table: String,
    why: String,
}

pub fn run(dirs: &Dirs, yes: bool, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    let tables = network_lock::tables().map_err(Error::Refused)?;
    let known = tables_named_by_dumps(dirs);
    let mut owners: BTreeMap<String, Owner> = BTreeMap::new();
    for o in network_lock::owners(&dirs.state_dir) {
        match o {
            Ok(o) => {
                owners.insert(o.table.clone(), o);
            }
            Err(e) => eprintln!("stasis: warning: {}", crate::text::escape_lines(&e.to_string())),
        }
    }
    let here = network_lock::canonical_state_dir(&dirs.state_dir);
    let (mut kept, mut orphaned, mut not_ours) = (Vec::new(), Vec::new(), Vec::new());
    for t in tables.iter().cloned() {
        if known.contains(&t) {
            kept.push(t);
            continue;
        }
        match owners.get(&t) {
            None => not_ours.push(NotOurs {
                why: format!("{} has no record of it (another state dir's, or not stasis's)", dirs.state_dir.display()),
                table: t,
            }),
            Some(o) if o.state_dir != here => not_ours.push(NotOurs {
                why: format!("recorded for the state dir {}; run gc with --state-dir there", o.state_dir.display()),
                table: t,
            }),
            Some(o) if checkpoint_exists(dirs, o) => kept.push(t),
            Some(_) => orphaned.push(t),
        }
    }
    if yes {
        for t in &orphaned {
            if network_lock::delete_table(t) {
                network_lock::forget_owner(&dirs.state_dir, t);
            }
        }
        // Records whose table is gone (restored, released, or a reboot) own nothing.
        for o in owners.values().filter(|o| !tables.contains(&o.table)) {
            network_lock::forget_owner(&dirs.state_dir, &o.table);
        }
    }
    if json {
        print_json(&Report { orphaned_tables: orphaned, kept_tables: kept, not_ours_tables: not_ours, deleted: yes });
        return Ok(exit_codes::OK);
    }
    print_report(dirs, yes, &orphaned, &kept, &not_ours);
    Ok(exit_codes::OK)
}

/// Tables named by a dump log anywhere in the state dir: a checkpoint (kept or quarantined),
/// a dump cut short, the last failed dump.
fn tables_named_by_dumps(dirs: &Dirs) -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for name in dirs.services_with_state() {
        let paths = dirs.service(&name);
        let mut logs: Vec<std::path::PathBuf> =
            CheckpointStore::new(&paths).all_dump_dirs().into_iter().map(|d| d.join(crate::criu::DUMP_LOG)).collect();
        logs.push(paths.failed_dump_log());
        known.extend(logs.iter().filter_map(|l| network_lock::table_of_dump(l)));
    }
    known
}

/// Whether the recorded checkpoint is still anywhere in its service's store. A record naming a
/// service or checkpoint that could step outside the state dir proves nothing: kept.
fn checkpoint_exists(dirs: &Dirs, o: &Owner) -> bool {
    let plain = |s: &str| !s.is_empty() && !s.starts_with('.') && !s.contains('/');
    if crate::config::check_name(&o.service).is_err() || !plain(&o.checkpoint) {
        return true;
    }
    let paths = dirs.service(&o.service);
    if paths.checkpoints().join(&o.checkpoint).exists() {
        return true;
    }
    // Quarantined under its id, or `ID-N` when that id was quarantined before.
    CheckpointStore::new(&paths).quarantined().iter().any(|q| q.id() == o.checkpoint || q.name == o.checkpoint)
}

fn print_report(dirs: &Dirs, yes: bool, orphaned: &[String], kept: &[String], not_ours: &[NotOurs]) {
    let state = dirs.state_dir.display();
    for n in not_ours {
        println!("not ours: table inet {} ({}; left alone)", n.table, crate::text::escape_lines(&n.why));
    }
    if orphaned.is_empty() {
        println!("no orphaned CRIU network-lock tables ({} kept for checkpoints in {state})", kept.len());
        return;
    }
    for t in orphaned {
        let what = if yes { "deleted" } else { "orphaned" };
        println!("{what}: table inet {t} (its checkpoint in {state} is gone)");
    }
    if !yes {
        println!(
            "{} table(s) hold connections of checkpoints of {state} that no longer exist and slow every dump on this host; delete them with `stasis gc --yes`",
            orphaned.len()
        );
    }
}
