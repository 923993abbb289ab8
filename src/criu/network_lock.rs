//! CRIU's nftables network lock. A dump that stops the service leaves a table
//! `inet CRIU-<run id>` that holds the service's TCP connections until the restore of that same
//! checkpoint removes it. A checkpoint that will never be restored (quarantined) must release
//! its table, or the tables pile up for good.
//!
//! Table names are host-wide while state dirs are not: each table a dump leaves is recorded
//! in its state dir (`STATE/network-locks/TABLE.json`: state dir, service, checkpoint), so
//! `stasis gc` deletes only tables it can prove are of a checkpoint of its own that is gone.

use crate::store::durable::{create_dir_with_mode, write_atomic};
use crate::store::StoreError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// CRIU builds the name in a 32-byte buffer: "inet CRIU-" plus the first 21 characters of the id.
const RUN_ID_CHARS: usize = 21;

/// The nftables table a dump left, from the dump's log (`CRIU run id = ...`).
pub fn table_of_dump(dump_log: &Path) -> Option<String> {
    // The run id is among the first lines; the log may be long.
    let mut head = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(std::fs::File::open(dump_log).ok()?, 64 * 1024), &mut head)
        .ok()?;
    let text = String::from_utf8_lossy(&head);
    // Over RPC the log names two: criu's own at its start, then the request's, which the dump
    // names its table after (the restore's log says so: `Dump CRIU run id = ...`). The last one.
    let id = text
        .lines()
        .filter(|l| !l.contains("Dump CRIU run id"))
        .filter_map(|l| l.split_once("CRIU run id = ").map(|(_, id)| id.trim().to_string()))
        .last()?;
    Some(format!("CRIU-{}", id.chars().take(RUN_ID_CHARS).collect::<String>()))
}

/// The CRIU tables in the host's ruleset now (`CRIU-...`), or why they could not be listed.
pub fn tables() -> Result<Vec<String>, String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("failed to run nft: {e}; install nftables (scripts/setup does)"))?;
    if !out.status.success() {
        return Err(format!("`nft list tables` failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .filter(|t| t.starts_with("CRIU-"))
        .map(|t| t.trim().to_string())
        .collect())
}

/// Deletes one table by name; true if it was there.
pub fn delete_table(table: &str) -> bool {
    Command::new("nft")
        .args(["delete", "table", "inet", table])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Left beside a dump's log once its table is known to be gone (CRIU removed it at the
/// restore, or stasis deleted it), so nothing runs `nft` for it again: an `nft` run costs more
/// than the rest of a stop's bookkeeping together.
const RELEASED_MARKER: &str = "network-lock-released";

fn marker(dump_log: &Path) -> Option<std::path::PathBuf> {
    dump_log.parent().map(|d| d.join(RELEASED_MARKER))
}

/// Records that the dump's table is gone; best effort (without it, `release` asks nft again).
fn mark_released(dump_log: &Path) {
    if let Some(m) = marker(dump_log) {
        let _ = std::fs::write(m, b"");
    }
}

/// Whether the dump's table may still exist: it named one and nobody has removed it since.
pub fn may_hold(dump_log: &Path) -> bool {
    !marker(dump_log).is_some_and(|m| m.exists()) && table_of_dump(dump_log).is_some()
}

/// Deletes the dump's table if it still exists; best effort (no nft, no table: nothing to do).
fn release(dump_log: &Path) {
    if !may_hold(dump_log) {
        return;
    }
    let Some(table) = table_of_dump(dump_log) else { return };
    let out = Command::new("nft").args(["delete", "table", "inet", &table]).stdout(Stdio::null()).output();
    // Deleted, or not there to delete ("No such file or directory"): gone either way.
    let gone = out.is_ok_and(|o| o.status.success() || String::from_utf8_lossy(&o.stderr).contains("No such file"));
    if gone {
        mark_released(dump_log);
    }
}

/// How the network lock of a checkpoint (or of a dump that made none) ends. Every place where a
/// checkpoint leaves the store, or a dump ends, says which through [`end`], the one owner of
/// what happens to the table and its owner record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockEnd {
    /// CRIU removed the table itself: the checkpoint was restored, or the dump left the
    /// service running.
    RemovedByCriu,
    /// Nothing will ever restore it (deleted, pruned, beyond retention, quarantined, purged,
    /// stale after a start, a dump that failed or was cut short): its table is deleted now, or
    /// it would hold the service's connections for good.
    NeverRestored,
}

/// Ends the lock of the dump whose log is in `dir`. For a table deleted, the owner record in
/// `state_dir` goes too. Returns the table's name when it was still held and is gone now;
/// Err names a table that could not be deleted (`stasis gc` deletes it later).
pub fn end(state_dir: &Path, dir: &Path, why: LockEnd) -> Result<Option<String>, String> {
    let log = dir.join(crate::criu::DUMP_LOG);
    if why == LockEnd::RemovedByCriu {
        mark_released(&log);
        return Ok(None);
    }
    let Some(table) = may_hold(&log).then(|| table_of_dump(&log)).flatten() else {
        return Ok(None);
    };
    release(&log);
    if may_hold(&log) {
        return Err(table);
    }
    forget_owner(state_dir, &table);
    Ok(Some(table))
}

/// Where the owners of a state dir's tables are recorded.
const OWNERS_DIR: &str = "network-locks";
/// A record is a few hundred bytes; anything larger is not one of ours.
const OWNER_MAX_BYTES: u64 = 64 * 1024;

/// Who a CRIU table belongs to: a checkpoint of a service of a state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub table: String,
    pub state_dir: PathBuf,
    pub service: String,
    pub checkpoint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("failed to record that nftables table {table} belongs to checkpoint {checkpoint}: {source}")]
    Record { table: String, checkpoint: String, source: StoreError },
    #[error("failed to read the owner record {path}: {why}; it is ignored (its table counts as not ours); delete the file if its table is gone")]
    Unreadable { path: PathBuf, why: String },
}

/// Whether `table` is a name CRIU gives (`CRIU-` and 21 characters of a run id): only such
/// names ever reach `nft delete`.
pub fn is_criu_table(table: &str) -> bool {
    table
        .strip_prefix("CRIU-")
        .is_some_and(|id| id.len() == RUN_ID_CHARS && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
}

/// The state dir as recorded and compared: its canonical path when it has one.
pub fn canonical_state_dir(state_dir: &Path) -> PathBuf {
    std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf())
}

/// Records that the table the dump left (if it may hold one) belongs to `checkpoint`.
pub fn record_owner(state_dir: &Path, service: &str, checkpoint: &str, dump_log: &Path) -> Result<(), OwnerError> {
    if !may_hold(dump_log) {
        return Ok(());
    }
    let Some(table) = table_of_dump(dump_log).filter(|t| is_criu_table(t)) else { return Ok(()) };
    let owner = Owner {
        table: table.clone(),
        state_dir: canonical_state_dir(state_dir),
        service: service.to_string(),
        checkpoint: checkpoint.to_string(),
    };
    let dir = state_dir.join(OWNERS_DIR);
    let bytes = serde_json::to_vec_pretty(&owner).expect("an owner record serializes");
    create_dir_with_mode(&dir, 0o700)
        .and_then(|_| write_atomic(&dir.join(format!("{table}.json")), &bytes))
        .map_err(|source| OwnerError::Record { table, checkpoint: checkpoint.to_string(), source })
}

/// Every owner record of a state dir; records that cannot be trusted come back as errors.
pub fn owners(state_dir: &Path) -> Vec<Result<Owner, OwnerError>> {
    let Ok(rd) = std::fs::read_dir(state_dir.join(OWNERS_DIR)) else { return Vec::new() };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".json") && !n.starts_with('.')))
        .map(|e| read_owner(&e.path()))
        .collect()
}

fn read_owner(path: &Path) -> Result<Owner, OwnerError> {
    let bad = |why: String| OwnerError::Unreadable { path: path.to_path_buf(), why };
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| bad(e.to_string()))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(bad("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, OWNER_MAX_BYTES + 1), &mut bytes)
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > OWNER_MAX_BYTES {
        return Err(bad(format!("larger than {OWNER_MAX_BYTES} bytes")));
    }
    let owner: Owner = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let named = path.file_stem().and_then(|s| s.to_str()) == Some(owner.table.as_str());
    if !named || !is_criu_table(&owner.table) {
        return Err(bad(format!("it names table {:?}, not the one in its file name", owner.table)));
    }
    Ok(owner)
}

/// Deletes the owner record of `table` (its table is gone); best effort.
pub fn forget_owner(state_dir: &Path, table: &str) {
    if is_criu_table(table) {
        let _ = std::fs::remove_file(state_dir.join(OWNERS_DIR).join(format!("{table}.json")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_name_matches_criu() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("dump.log");
        std::fs::write(&log, "(00.000010) CRIU run id = 678ec589-7bdb-4e19-bd2f-0123456789ab\n").unwrap();
        assert_eq!(table_of_dump(&log).unwrap(), "CRIU-678ec589-7bdb-4e19-bd");
        // Over RPC: criu's own id first, then the request's, which names the table.
        let rpc = "(00.000000) CRIU run id = 1452730e-f38f-44aa-9ba7-256d96c4137f\n(00.000000) CRIU run id = 9fdf66af-0498-4825-ba4b-8a858ef6489e\n";
        std::fs::write(&log, rpc).unwrap();
        assert_eq!(table_of_dump(&log).unwrap(), "CRIU-9fdf66af-0498-4825-ba");
    }

    #[test]
    fn owners_are_recorded_and_read_back_and_forged_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("dump.log");
        std::fs::write(&log, "(00.000010) CRIU run id = 678ec589-7bdb-4e19-bd2f-0123456789ab\n").unwrap();
        record_owner(d.path(), "svc", "00000001-x", &log).unwrap();
        let got: Vec<Owner> = owners(d.path()).into_iter().map(Result::unwrap).collect();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].table, "CRIU-678ec589-7bdb-4e19-bd");
        assert_eq!(got[0].checkpoint, "00000001-x");
        assert_eq!(got[0].state_dir, canonical_state_dir(d.path()));
        // A record whose content names another table than its file is not trusted.
        let forged = d.path().join(OWNERS_DIR).join("CRIU-000000000000000000000.json");
        std::fs::write(&forged, serde_json::to_vec(&got[0]).unwrap()).unwrap();
        assert_eq!(owners(d.path()).iter().filter(|o| o.is_err()).count(), 1);
        forget_owner(d.path(), "CRIU-678ec589-7bdb-4e19-bd");
        assert!(owners(d.path()).iter().all(|o| o.is_err()));
        // Released already: nothing to record.
        mark_released(&log);
        record_owner(d.path(), "svc", "00000002-x", &log).unwrap();
        assert!(owners(d.path()).iter().all(|o| o.is_err()));
        assert!(!is_criu_table("CRIU-; rm -rf /"), "only CRIU's names reach nft");
    }
}
