//! The text protocol of the kill port and the control socket. A connection gets a first line
//! at once, then exactly one final line that starts with `OK` or `ERROR`.

use crate::time_fmt::human_bytes;
use std::path::PathBuf;
use std::time::Duration;

/// Sent on the control socket to ask for a checkpoint that leaves the service running.
pub const CHECKPOINT_COMMAND: &str = "checkpoint";
/// Asks the control socket for a dry-run dump (`stasis doctor`).
pub const DOCTOR_COMMAND: &str = "doctor";
/// Lines about a dump under way start with this.
pub const PROGRESS_PREFIX: &str = "Progress: ";
/// Sent by `stasis stop` on the kill port right after connecting (telnet sends nothing).
pub const STOP_COMMAND: &str = "stop";
/// First words of HTTP requests: a browser or a scanner, never an operator.
const HTTP_METHODS: &[&str] =
    &["GET ", "POST ", "HEAD ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE ", "PRI * HTTP"];

/// Whether what a kill-port client sent first looks like an HTTP request.
pub fn looks_like_http(first: &[u8]) -> bool {
    HTTP_METHODS.iter().any(|m| first.starts_with(m.as_bytes()))
}

pub fn refused_uid(uid: u32, service: &str) -> String {
    format!("refused: uid {uid} may not stop {service}\n")
}

pub fn refused_http(service: &str) -> String {
    format!(
        "refused: this is the kill port of {service}; it checkpoints and stops the service and does not speak HTTP\n"
    )
}

pub fn joined(service: &str) -> String {
    format!("A checkpoint of {service} is already in progress; waiting for it")
}

#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub id: String,
    pub size_bytes: u64,
    pub duration: Duration,
    pub dir: PathBuf,
    /// What retention removed after it (for the log).
    pub notes: Vec<String>,
    /// How long CRIU kept the service frozen, when its stats say.
    pub freeze: Option<Duration>,
    /// A dry run (`stasis doctor`): dumped, then thrown away.
    pub dry: bool,
}

pub fn announce_stop(service: &str) -> String {
    format!("Saving checkpoint of {service} and shutting down...\n")
}

pub fn announce_doctor(service: &str) -> String {
    format!("Trying a checkpoint of {service} that is thrown away (it keeps running)...\n")
}

pub fn announce_checkpoint(service: &str) -> String {
    format!("Saving checkpoint of {service} (it keeps running)...\n")
}

pub fn final_line(outcome: &Result<CheckpointReport, String>) -> String {
    match outcome {
        Ok(r) if r.dry => format!(
            "OK it can be checkpointed now: CRIU dumped {} in {:.2} s (a dry run; nothing was kept)\n",
            human_bytes(r.size_bytes),
            r.duration.as_secs_f64()
        ),
        Ok(r) => format!(
            "OK checkpoint {} saved ({}, {:.2} s) in {}\n",
            r.id,
            human_bytes(r.size_bytes),
            r.duration.as_secs_f64(),
            r.dir.display()
        ),
        // CRIU's error lines go first, indented; the last line is always the verdict. Each is
        // escaped: they quote names the service chose, and a client may be a terminal.
        Err(e) => {
            let mut lines = e.lines().map(crate::text::escape_controls);
            let summary = lines.next().unwrap_or_default();
            let mut out: String = lines.map(|l| format!("  {l}\n")).collect();
            out.push_str(&format!("ERROR {summary}\n"));
            out
        }
    }
}

/// Parses a final line: Ok(text after OK) or Err(text after ERROR).
pub fn parse_final(line: &str) -> Option<Result<String, String>> {
    if let Some(rest) = line.strip_prefix("OK") {
        return Some(Ok(rest.trim().to_string()));
    }
    line.strip_prefix("ERROR").map(|rest| Err(rest.trim().to_string()))
}

/// The checkpoint id in an OK line.
pub fn checkpoint_id(ok_text: &str) -> Option<&str> {
    ok_text.strip_prefix("checkpoint ")?.split_whitespace().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_requests_are_recognised() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"POST /x HTTP/1.0\r\n"));
        assert!(!looks_like_http(b"stop\n"));
        assert!(!looks_like_http(b"\r\n"));
        assert!(!looks_like_http(b""));
    }

    #[test]
    fn final_lines_round_trip() {
        let r = CheckpointReport {
            id: "20261125T015053.123Z".into(),
            size_bytes: 5_000_000,
            duration: Duration::from_millis(61),
            dir: "/x".into(),
            notes: Vec::new(),
            freeze: None,
            dry: false,
        };
        let line = final_line(&Ok(r));
        assert!(line.starts_with("OK checkpoint 20261125T015053.123Z saved (4.8 MiB, 0.06 s)"), "{line}");
        let ok = parse_final(line.trim()).unwrap().unwrap();
        assert_eq!(checkpoint_id(&ok), Some("20261125T015053.123Z"));
        let err = final_line(&Err("failed to dump\n(0.1) Error (x.c:1): why".into()));
        assert_eq!(err, "  (0.1) Error (x.c:1): why\nERROR failed to dump\n");
        assert_eq!(parse_final(err.lines().last().unwrap()), Some(Err("failed to dump".into())));
    }
}

#[cfg(test)]
mod escaping_tests {
    use super::final_line;

    #[test]
    fn an_error_line_cannot_drive_the_clients_terminal_or_forge_a_verdict() {
        let e = "evil\u{1b}]0;pwned\u{7} is open\n(0.1) Error (x.c:1): ghost \u{1b}[2K\rOK checkpoint 1 saved\u{9b}";
        let line = final_line(&Err(e.into()));
        assert_eq!(
            line,
            "  (0.1) Error (x.c:1): ghost \\x1b[2K\\rOK checkpoint 1 saved\\u{9b}\nERROR evil\\x1b]0;pwned\\x07 is open\n"
        );
    }
}
