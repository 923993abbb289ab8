use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("failed to find CRIU: no `criu` in PATH or STASIS_CRIU; run `scripts/setup` (as root) to build and install CRIU {min}+")]
    Missing { min: &'static str },
    #[error("failed to use CRIU at {path}: version {found} is too old, stasis needs {min} or newer; run `scripts/setup` to install it")]
    TooOld { path: PathBuf, found: String, min: &'static str },
    #[error("failed to run {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("failed to read CRIU's version from `{path} --version` (printed: {output:?})")]
    Version { path: PathBuf, output: String },
    #[error("failed to {action} with CRIU ({status}); log: {log}{}", render_lines(errors))]
    Failed { action: &'static str, status: String, log: PathBuf, errors: Vec<String> },
    #[error("failed to {action} with CRIU: it took longer than {setting} ({}), so it was stopped; raise `{setting}` in the service file if it is that slow for this service; log: {log}", crate::time_fmt::human_duration(*after))]
    TimedOut { action: &'static str, setting: &'static str, after: std::time::Duration, log: PathBuf },
}

/// Why a restore failed, as far as CRIU's log tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreFailure {
    /// Something on the host, not the images (the text says what): the checkpoint is fine and
    /// can be restored once that is fixed.
    Environment(&'static str),
    /// Anything else: the checkpoint may be at fault.
    Checkpoint,
}

/// Log phrases that blame the host rather than the images: every phrase of an entry must be
/// on the same error line (CRIU 4.2.1's messages: files-reg.c, sk-unix.c, files.c, errno texts).
const ENVIRONMENT_CAUSES: &[(&[&str], &str)] = &[
    (&["Address already in use"], "an address or port the service listens on is in use by another process"),
    (&["Cannot allocate memory"], "the host is out of memory"),
    (&["No space left on device"], "a filesystem is full"),
    (&["Too many open files"], "the host is out of file descriptors"),
    (&["Resource temporarily unavailable"], "a host resource is temporarily exhausted"),
    // The images are fine; the other end of a unix socket the service was connected to is not.
    (
        &["unix: Can't connect"],
        "the server of a unix socket the service was connected to (syslog's /dev/log, a database's socket) is not listening; start it, then start the service again",
    ),
    (
        &["Can't bind", "No such file or directory"],
        "the directory of a unix socket the service binds is missing (the line names the socket); create it with the owner and mode the service needs, then start again",
    ),
    (
        &["Can't change working dir", "No such file or directory"],
        "the directory of a unix socket the service uses is missing (the line names it); create it, then start again",
    ),
    (
        &["has bad size"],
        "a file the service had open changed size since the checkpoint (the line names it, with the size the memory expects); put it back as it was, then start again",
    ),
    (
        &["has bad mode"],
        "a file the service had open changed its type or permissions since the checkpoint (the line names it); chmod it back, then start again",
    ),
    (
        &["Can't open file", "No such file or directory"],
        "a file or directory the service had open is missing (the line names it); put it back, then start again",
    ),
    (
        &["Can't open file", "Permission denied"],
        "a file the service had open can no longer be opened (its owner or mode changed, or its user no longer exists); give it back its owner and mode, then start again",
    ),
    // tty.c: the pty pair is reopened under its old number, which another session now holds.
    (
        &["Unable to open", "with specified index"],
        "the pseudo-terminal number the service's session had (/dev/pts/N) is now held by another session on this host; end that session (or wait for it to close), then start again",
    ),
    (
        &["Can't change cwd", "No such file or directory"],
        "the service's working directory is missing; create it, then start again",
    ),
];

fn render_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut out = String::from("\n");
    for l in lines {
        out.push_str("    ");
        // Log lines quote names the service chose (and stderr lines are not picked): escaped.
        out.push_str(&crate::text::escape_controls(l));
        out.push('\n');
    }
    out.pop();
    out
}

impl CriuError {
    /// Classifies a failed restore by its first error lines.
    pub fn restore_failure(&self) -> RestoreFailure {
        let CriuError::Failed { errors, .. } = self else { return RestoreFailure::Checkpoint };
        errors
            .iter()
            .filter(|l| l.contains("Error"))
            .find_map(|l| {
                ENVIRONMENT_CAUSES
                    .iter()
                    .find(|(all, _)| all.iter().all(|p| l.contains(p)))
                    .map(|(_, why)| RestoreFailure::Environment(why))
            })
            .unwrap_or(RestoreFailure::Checkpoint)
    }

    /// A one-line form for the kill port's ERROR line and status files.
    pub fn one_line(&self) -> String {
        match self {
            CriuError::Failed { action, status, log, errors } => {
                // The first error is the cause; the later ones are CRIU unwinding.
                let first = errors.iter().find(|l| l.contains("Error")).or(errors.last()).cloned().unwrap_or_default();
                let first = first.split_once("): ").map(|(_, m)| m).unwrap_or(&first).trim();
                let first = if first.is_empty() { "its log has no error lines (was it written?)" } else { first };
                let first = crate::text::escape_controls(first);
                format!("failed to {action} with CRIU ({status}): {first} (log: {})", log.display())
            }
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(lines: &[&str]) -> CriuError {
        CriuError::Failed {
            action: "restore the checkpoint",
            status: "exit status: 1".into(),
            log: "/x/restore.log".into(),
            errors: lines.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_port_in_use_is_the_host_not_the_checkpoint() {
        let pty = failed(&["(0.2) Error (criu/tty.c:625): tty: Unable to open dev/ptmx with specified index 0"]);
        assert!(matches!(pty.restore_failure(), RestoreFailure::Environment(w) if w.contains("pseudo-terminal")));
        let e = failed(&["(0.1) Error (criu/sk-inet.c:1): Can't bind inet socket (id 5): Address already in use"]);
        assert!(matches!(e.restore_failure(), RestoreFailure::Environment(w) if w.contains("in use")));
        let e = failed(&["(0.1) Error (criu/pagemap.c:1): Can't read mapping page 0: Input/output error"]);
        assert_eq!(e.restore_failure(), RestoreFailure::Checkpoint);
    }

    #[test]
    fn what_a_reboot_or_a_person_changed_on_the_host_is_the_host() {
        for (line, says) in [
            ("Error (criu/files-reg.c:2175): File /tmp/x/out.log has bad size 4293 (expect 2601)", "changed size"),
            ("Error (criu/files-reg.c:2294): File /tmp/x has bad mode 0100600 (expect 0100644)", "permissions"),
            ("Error (criu/files-reg.c:2267): Can't open file tmp/x/in.txt: No such file or directory", "missing"),
            ("Error (criu/files-reg.c:2267): Can't open file tmp/x: Permission denied", "owner or mode"),
            (
                "1: Error (criu/sk-unix.c:1651): Can't bind id 0x7 ino 1234 addr /run/r/redis.sock: No such file or directory",
                "unix socket the service binds",
            ),
            ("Error (criu/sk-unix.c:1328): Can't change working dir /run/r: No such file or directory", "missing"),
        ] {
            let e = failed(&[line]);
            assert!(matches!(e.restore_failure(), RestoreFailure::Environment(w) if w.contains(says)), "{line}");
        }
    }

    #[test]
    fn a_missing_unix_server_is_the_host_not_the_checkpoint() {
        let e = failed(&["(0.1) 1: Error (criu/sk-unix.c:1): unix: Can't connect 7 socket: Connection refused"]);
        assert!(matches!(e.restore_failure(), RestoreFailure::Environment(w) if w.contains("not listening")));
    }
}
