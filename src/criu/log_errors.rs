//! Picks the lines worth showing out of a CRIU log: each `Error (...)` line with the few lines
//! before it (as runc's logCriuErrors does), minus errors known to be harmless on this host,
//! with control characters escaped (CRIU quotes names the service chose).

use std::path::Path;

const CONTEXT_BEFORE: usize = 3;
const MAX_LINES: usize = 24;
/// Printed by every criu run where root lacks CAP_SYS_RESOURCE; CRIU carries on.
const HARMLESS: &[&str] = &["Can't setup RLIMIT_NOFILE for self"];

/// Only the end of a log is read: that is where the errors that ended the run are, and a log
/// can be large.
const READ_AT_MOST: u64 = 1 << 20;

pub fn error_lines(log: &Path) -> Vec<String> {
    match super::log_capture::read_tail(log, READ_AT_MOST) {
        Ok(text) => pick(&text),
        Err(_) => Vec::new(),
    }
}

pub fn pick(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut keep = vec![false; lines.len()];
    for (i, l) in lines.iter().enumerate() {
        if l.contains("Error (") && !HARMLESS.iter().any(|h| l.contains(h)) {
            for k in keep.iter_mut().take(i + 1).skip(i.saturating_sub(CONTEXT_BEFORE)) {
                *k = true;
            }
        }
    }
    // CRIU quotes file and socket names the service chose: escaped here, before any use.
    let picked: Vec<String> =
        lines.iter().zip(keep).filter(|(_, k)| *k).map(|(l, _)| crate::text::escape_controls(l).into_owned()).collect();
    // The last errors are the ones that ended the run.
    picked[picked.len().saturating_sub(MAX_LINES)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::pick;

    #[test]
    fn keeps_errors_with_context_and_drops_harmless_ones() {
        let log = "(0.1) a\n(0.2) Error (criu/util.c:1): Can't setup RLIMIT_NOFILE for self\n(0.3) b\n(0.4) c\n(0.5) d\n(0.6) e\n(0.7) Error (criu/sk.c:9): External socket is used\n(0.8) f\n";
        assert_eq!(
            pick(log),
            vec!["(0.4) c", "(0.5) d", "(0.6) e", "(0.7) Error (criu/sk.c:9): External socket is used"]
        );
    }
}
