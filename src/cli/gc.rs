//! `stasis gc`: finds what checkpoints left on the host that nothing needs any more: CRIU
//! network-lock tables (`inet CRIU-...`) whose checkpoint no longer exists in the state dir
//! (deleted by hand, or from before retention), and namespace-init copies no checkpoint maps.
//! Lists them; `--yes` deletes them.

use super::output::print_json;
use crate::criu::network_lock;
use crate::error::Error;
use crate::exit_codes;
use crate::paths::Dirs;
use crate::store::CheckpointStore;
use serde::Serialize;
use std::collections::BTreeSet;

#[derive(Serialize)]
struct Report {
    /// Tables whose checkpoint is gone.
    orphaned_tables: Vec<String>,
    /// Tables that belong to a checkpoint in the state dir (kept: its restore needs them).
    kept_tables: Vec<String>,
    deleted: bool,
}

pub fn run(dirs: &Dirs, yes: bool, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    let tables = network_lock::tables().map_err(Error::Refused)?;
    let mut known: BTreeSet<String> = BTreeSet::new();
    for name in dirs.services_with_state() {
        let paths = dirs.service(&name);
        let mut logs: Vec<std::path::PathBuf> =
            CheckpointStore::new(&paths).all_dump_dirs().into_iter().map(|d| d.join(crate::criu::DUMP_LOG)).collect();
        logs.push(paths.failed_dump_log());
        known.extend(logs.iter().filter_map(|l| network_lock::table_of_dump(l)));
    }
    let (kept, orphaned): (Vec<String>, Vec<String>) = tables.into_iter().partition(|t| known.contains(t));
    if yes {
        for t in &orphaned {
            network_lock::delete_table(t);
        }
    }
    if json {
        print_json(&Report { orphaned_tables: orphaned, kept_tables: kept, deleted: yes });
        return Ok(exit_codes::OK);
    }
    if orphaned.is_empty() {
        println!(
            "no orphaned CRIU network-lock tables ({} kept for checkpoints in {})",
            kept.len(),
            dirs.state_dir.display()
        );
        return Ok(exit_codes::OK);
    }
    for t in &orphaned {
        let what = if yes { "deleted" } else { "orphaned" };
        println!("{what}: table inet {t} (no checkpoint in {} holds it)", dirs.state_dir.display());
    }
    if !yes {
        println!(
            "{} table(s) hold connections of checkpoints that no longer exist and slow every dump on this host; delete them with `stasis gc --yes` (tables of another state dir on this host are listed too: pass its --state-dir to check it)",
            orphaned.len()
        );
    }
    Ok(exit_codes::OK)
}
