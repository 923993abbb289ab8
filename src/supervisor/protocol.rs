//! The text protocol of the kill port and the control socket. A connection gets a first line
//! at once, then exactly one final line, the `Verdict`, that starts with `OK` or `ERROR`.

use super::outcome::Outcome;
pub use crate::engine::dump::CheckpointReport;
use crate::time_fmt::human_bytes;
use std::time::Duration;

/// Sent on the control socket to ask for a checkpoint that leaves the service running.
pub const CHECKPOINT_COMMAND: &str = "checkpoint";
/// Asks the control socket for a dry-run dump (`stasis doctor`).
pub const DOCTOR_COMMAND: &str = "doctor";
/// Asks the control socket to stop the service without a checkpoint (`stasis stop
/// --no-checkpoint`): SIGTERM to its tree, SIGKILL after `stop_timeout_secs`.
pub const TERMINATE_COMMAND: &str = "stop-no-checkpoint";
pub use crate::engine::progress::{PROGRESS_PREFIX, WAITING_PREFIX};
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

/// The reply's end: CRIU's error lines first, indented, then the verdict, always last. Each is
/// escaped: they quote names the service chose, and a client may be a terminal.
pub fn final_line(outcome: &Outcome) -> String {
    let details = match outcome {
        Ok(_) => &[][..],
        Err(e) => e.details(),
    };
    let mut out: String = details.iter().map(|l| format!("  {}\n", crate::text::escape_controls(l))).collect();
    out.push_str(&format!("{}\n", Verdict::of(outcome)));
    out
}

/// The last line of every reply on the kill port and the control socket: what a telnet user
/// reads, built by the supervisor from this (`Display`), and what `stasis stop`, `checkpoint`,
/// `doctor` and `stop --no-checkpoint` read back into it (`parse`). Texts are as sent (escaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `OK checkpoint ID saved (SIZE, SECONDS s) in DIR`: the checkpoint is durable.
    Saved { id: String, size: String, seconds: String, dir: String },
    /// `OK it can be checkpointed now: ...`: a dry run dumped, and kept nothing.
    DryRun { size: String, seconds: String },
    /// `OK HOW`: stopped without a checkpoint; how the service ended.
    Ended(String),
    /// `ERROR WHY`: the request failed (the summary; CRIU's lines came before it).
    Failed(String),
}

/// What a client asked for, which says which `OK` it may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// A checkpoint: `stop` on the kill port, `checkpoint` on the control socket.
    Checkpoint,
    /// `doctor`'s dry run.
    DryRun,
    /// `stop --no-checkpoint`.
    Terminate,
}

const SAVED: &str = "checkpoint ";
const DRY_RUN: &str = "it can be checkpointed now: CRIU dumped ";

impl Verdict {
    /// The verdict on a dump: a failure's summary.
    pub fn of(outcome: &Outcome) -> Verdict {
        let seconds = |d: &Duration| format!("{:.2}", d.as_secs_f64());
        match outcome {
            Ok(r) if r.dry => Verdict::DryRun { size: human_bytes(r.size_bytes), seconds: seconds(&r.duration) },
            Ok(r) => Verdict::Saved {
                id: r.id.clone(),
                size: human_bytes(r.size_bytes),
                seconds: seconds(&r.duration),
                dir: r.dir.display().to_string(),
            },
            Err(e) => Verdict::failed(&e.summary()),
        }
    }

    pub fn ended(how: &str) -> Verdict {
        Verdict::Ended(crate::text::escape_controls(how).into_owned())
    }

    pub fn failed(why: &str) -> Verdict {
        Verdict::Failed(crate::text::escape_controls(why).into_owned())
    }

    /// Reads a reply's last line (without its line end) as the verdict on what was `asked`;
    /// None for anything else, a malformed `OK` line included.
    pub fn parse(line: &str, asked: Asked) -> Option<Verdict> {
        if let Some(why) = line.strip_prefix("ERROR ") {
            return Some(Verdict::Failed(why.to_string()));
        }
        let ok = line.strip_prefix("OK ")?;
        match asked {
            Asked::Checkpoint => {
                let (id, rest) = ok.strip_prefix(SAVED)?.split_once(" saved (")?;
                let (size, rest) = rest.split_once(", ")?;
                let (seconds, dir) = rest.split_once(" s) in ")?;
                let id_ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c));
                (id_ok && is_size(size) && is_seconds(seconds) && !dir.is_empty()).then(|| Verdict::Saved {
                    id: id.to_string(),
                    size: size.to_string(),
                    seconds: seconds.to_string(),
                    dir: dir.to_string(),
                })
            }
            Asked::DryRun => {
                let (size, rest) = ok.strip_prefix(DRY_RUN)?.split_once(" in ")?;
                let seconds = rest.strip_suffix(" s (a dry run; nothing was kept)")?;
                (is_size(size) && is_seconds(seconds))
                    .then(|| Verdict::DryRun { size: size.to_string(), seconds: seconds.to_string() })
            }
            Asked::Terminate => Some(Verdict::Ended(ok.to_string())),
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Saved { id, size, seconds, dir } => {
                write!(f, "OK {SAVED}{id} saved ({size}, {seconds} s) in {dir}")
            }
            Verdict::DryRun { size, seconds } => {
                write!(f, "OK {DRY_RUN}{size} in {seconds} s (a dry run; nothing was kept)")
            }
            Verdict::Ended(how) => write!(f, "OK {how}"),
            Verdict::Failed(why) => write!(f, "ERROR {why}"),
        }
    }
}

/// A size as `human_bytes` writes it: a number and a unit.
fn is_size(s: &str) -> bool {
    s.split_once(' ').is_some_and(|(n, unit)| {
        !n.is_empty()
            && n.chars().all(|c| c.is_ascii_digit() || c == '.')
            && !unit.is_empty()
            && unit.chars().all(|c| c.is_ascii_alphabetic())
    })
}

/// Seconds with two decimals.
fn is_seconds(s: &str) -> bool {
    s.split_once('.').is_some_and(|(whole, hundredths)| {
        !whole.is_empty()
            && hundredths.len() == 2
            && (whole.chars().chain(hundredths.chars())).all(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::dump::DumpError;
    use crate::supervisor::outcome::NotTaken;

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
        assert_eq!(line, "OK checkpoint 20261125T015053.123Z saved (4.8 MiB, 0.06 s) in /x\n");
        let Some(Verdict::Saved { id, size, dir, .. }) = Verdict::parse(line.trim_end(), Asked::Checkpoint) else {
            panic!("{line}")
        };
        assert_eq!((id.as_str(), size.as_str(), dir.as_str()), ("20261125T015053.123Z", "4.8 MiB", "/x"));
        let failed = DumpError::criu_failed("/l", &["(0.1) Error (x.c:1): why"]);
        let err = final_line(&Err(failed.into()));
        let summary = "failed to dump with CRIU (exit status 1): why (log: /l); the service keeps running and earlier checkpoints are untouched";
        assert_eq!(err, format!("  (0.1) Error (x.c:1): why\nERROR {summary}\n"));
        assert_eq!(
            Verdict::parse(err.lines().last().unwrap(), Asked::Checkpoint),
            Some(Verdict::Failed(summary.into()))
        );
        let dry = CheckpointReport { dry: true, size_bytes: 2048, duration: Duration::from_millis(1234), ..r_dry() };
        assert_eq!(
            final_line(&Ok(dry)),
            "OK it can be checkpointed now: CRIU dumped 2.0 KiB in 1.23 s (a dry run; nothing was kept)\n"
        );
        for bad in ["OK", "OK checkpoint", "OK checkpoint a saved", "OK checkpoint a b saved (1 B, 0.00 s) in /x", "ok"]
        {
            assert_eq!(Verdict::parse(bad, Asked::Checkpoint), None, "{bad}");
        }
    }

    fn r_dry() -> CheckpointReport {
        CheckpointReport {
            id: String::new(),
            size_bytes: 0,
            duration: Duration::ZERO,
            dir: "/p".into(),
            notes: Vec::new(),
            freeze: None,
            dry: true,
        }
    }

    proptest::proptest! {
        /// What the supervisor sends is what the CLI reads, field for field.
        #[test]
        fn every_verdict_reads_back_as_itself(
            id in "[0-9]{8}T[0-9]{6}\\.[0-9]{3}Z(-[0-9]{1,3})?",
            bytes in proptest::prelude::any::<u64>(),
            millis in 0u64..10_000_000,
            dir in "/[^\n]{0,40}",
            text in "(?s).{0,60}",
        ) {
            let duration = Duration::from_millis(millis);
            let saved = CheckpointReport { id, size_bytes: bytes, duration, dir: dir.into(), dry: false, ..r_dry() };
            let dry = CheckpointReport { size_bytes: bytes, duration, ..r_dry() };
            for (verdict, asked) in [
                (Verdict::of(&Ok(saved)), Asked::Checkpoint),
                (Verdict::of(&Ok(dry)), Asked::DryRun),
                (Verdict::ended(&text), Asked::Terminate),
                (Verdict::failed(&text), Asked::Checkpoint),
                (Verdict::of(&Err(NotTaken::NotRunning { service: text.clone() })), Asked::DryRun),
            ] {
                let line = verdict.to_string();
                proptest::prop_assert!(!line.contains('\n'), "{line:?}");
                proptest::prop_assert_eq!(Verdict::parse(&line, asked), Some(verdict));
            }
        }
    }
}

#[cfg(test)]
mod escaping_tests {
    use super::final_line;
    use crate::engine::dump::DumpError;

    #[test]
    fn an_error_line_cannot_drive_the_clients_terminal_or_forge_a_verdict() {
        let e = DumpError::criu_failed(
            "/evil\u{1b}]0;pwned\u{7}",
            &["(0.1) Error (x.c:1): ghost \u{1b}[2K\rOK checkpoint 1 saved\u{9b}"],
        );
        let line = final_line(&Err(e.into()));
        assert_eq!(
            line,
            "  (0.1) Error (x.c:1): ghost \\x1b[2K\\rOK checkpoint 1 saved\\u{9b}\nERROR failed to dump with CRIU (exit status 1): ghost \\x1b[2K\\rOK checkpoint 1 saved\\u{9b} (log: /evil\\x1b]0;pwned\\x07); the service keeps running and earlier checkpoints are untouched\n"
        );
    }
}
