//! CRIU's nftables network lock. A dump that stops the service leaves a table
//! `inet CRIU-<run id>` that holds the service's TCP connections until the restore of that same
//! checkpoint removes it. A checkpoint that will never be restored (quarantined) must release
//! its table, or the tables pile up for good.

use std::path::Path;
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
    let id = text.lines().find_map(|l| l.split_once("CRIU run id = ").map(|(_, id)| id.trim().to_string()))?;
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
pub fn mark_released(dump_log: &Path) {
    if let Some(m) = marker(dump_log) {
        let _ = std::fs::write(m, b"");
    }
}

/// Whether the dump's table may still exist: it named one and nobody has removed it since.
pub fn may_hold(dump_log: &Path) -> bool {
    !marker(dump_log).is_some_and(|m| m.exists()) && table_of_dump(dump_log).is_some()
}

/// Deletes the dump's table if it still exists; best effort (no nft, no table: nothing to do).
pub fn release(dump_log: &Path) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_name_matches_criu() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("dump.log");
        std::fs::write(&log, "(00.000010) CRIU run id = 678ec589-7bdb-4e19-bd2f-0123456789ab\n").unwrap();
        assert_eq!(table_of_dump(&log).unwrap(), "CRIU-678ec589-7bdb-4e19-bd");
    }
}
