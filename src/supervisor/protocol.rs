//! The text protocol of the kill port and the control socket. A connection gets a first line
//! at once, then exactly one final line that starts with `OK` or `ERROR`.

use crate::time_fmt::human_bytes;
use std::path::PathBuf;
use std::time::Duration;

/// Sent on the control socket to ask for a checkpoint that leaves the service running.
pub const CHECKPOINT_COMMAND: &str = "checkpoint";
/// Asks the control socket for a dry-run dump (`stasis doctor`).
pub const DOCTOR_COMMAND: &str = "doctor";
/// Asks the control socket to stop the service without a checkpoint (`stasis stop
/// --no-checkpoint`): SIGTERM to its tree, SIGKILL after `stop_timeout_secs`.
pub const TERMINATE_COMMAND: &str = "stop-no-checkpoint";
/// Lines about a dump under way start with this.
pub const PROGRESS_PREFIX: &str = "Progress: ";
/// How a readiness wait's progress line begins (supervisor/progress.rs `waiting`).
pub const WAITING_PREFIX: &str = "Progress: waiting for ";
/// Sent by `stasis stop` on the kill port right after connecting (telnet sends nothing).
pub const STOP_COMMAND: &str = "stop";
/// What is read of a kill-port client's first bytes: the `stop` line needs 6, and enough of
/// anything else to say what it was (a long HTTP verb and its space).
pub const FIRST_BYTES: usize = 64;

/// What a kill-port client's first bytes ask for. The only requests are the line `stop` and
/// silence (telnet sends nothing until the operator types): anything else (a TLS hello, any
/// HTTP verb, a scanner's probe, a stray byte) is refused, so no program that merely connects
/// and talks can stop a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `stop` with its line end: stop now.
    Stop,
    /// Fewer bytes than a full `stop` line so far, all of them on the way to it: read more.
    Partial,
    /// Something other than `stop`.
    Refused(Refusal),
}

/// Why a kill-port request was refused (for the reply and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A TLS handshake (first byte 0x16): a browser or a client of https.
    Tls,
    /// An HTTP request line (a browser, curl, an `<img>` on a web page).
    Http,
    /// Any other bytes.
    Unknown,
}

/// Classifies what a kill-port client has sent so far (never empty: silence and end-of-file
/// are told apart by the caller, which alone knows whether the connection is still open).
pub fn classify(sent: &[u8]) -> Request {
    const LINE: &[u8] = b"stop";
    let refused = |sent: &[u8]| {
        if sent.first() == Some(&0x16) {
            Refusal::Tls
        } else if looks_like_http(sent) {
            Refusal::Http
        } else {
            Refusal::Unknown
        }
    };
    let word = sent.len().min(LINE.len());
    if sent[..word] != LINE[..word] {
        return Request::Refused(refused(sent));
    }
    match &sent[word..] {
        [] => Request::Partial,
        b"\n" | b"\r\n" => Request::Stop,
        b"\r" => Request::Partial,
        _ => Request::Refused(Refusal::Unknown),
    }
}

/// Whether bytes look like an HTTP request line: an upper-case token, a space, then a target.
/// Any verb counts (PURGE, PROPFIND...): a fixed list of methods let unknown ones through.
fn looks_like_http(first: &[u8]) -> bool {
    let verb = first.iter().take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_').count();
    verb > 0 && first.get(verb) == Some(&b' ')
}

pub fn refused_request(why: Refusal, service: &str) -> String {
    match why {
        Refusal::Tls | Refusal::Http => format!(
            "refused: this is the kill port of {service}; it checkpoints and stops the service and speaks neither HTTP nor TLS\n"
        ),
        Refusal::Unknown => format!(
            "refused: the kill port of {service} takes only the line \"{STOP_COMMAND}\" or a silent connection (telnet)\n"
        ),
    }
}

pub fn refused_uid(uid: u32, service: &str) -> String {
    format!("refused: uid {uid} may not stop {service}\n")
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

pub fn announce_terminate(service: &str, grace: Duration) -> String {
    format!("Stopping {service} without a checkpoint (SIGTERM, SIGKILL after {} s)...\n", grace.as_secs())
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
    fn only_the_stop_line_is_a_request() {
        assert_eq!(classify(b"stop\n"), Request::Stop);
        assert_eq!(classify(b"stop\r\n"), Request::Stop, "telnet ends lines with CR LF");
        for partial in [&b"s"[..], b"st", b"sto", b"stop", b"stop\r"] {
            assert_eq!(classify(partial), Request::Partial, "{partial:?}");
        }
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Request::Refused(Refusal::Tls), "a TLS ClientHello");
        for http in [&b"GET / HTTP/1.1\r\n"[..], b"PURGE / HTTP/1.1\r\n", b"POST /x HTTP/1.0\r\n", b"PRI * HTTP/2.0"] {
            assert_eq!(classify(http), Request::Refused(Refusal::Http), "{http:?}");
        }
        for other in
            [&b"\r\n"[..], b"\n", b"stop now\n", b"stopp", b"stop\n\n", b"\xff\xfd\x18", b"\0", b"STOP\n", b"x"]
        {
            assert!(matches!(classify(other), Request::Refused(_)), "{other:?}");
        }
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
