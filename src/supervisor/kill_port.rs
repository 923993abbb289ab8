//! Admission on the kill port: who may stop the service, and what counts as asking. A stop
//! happens only for a client whose socket the kernel shows ESTABLISHED, owned by a process
//! (inode not 0) of an allowed uid, that sends the line `stop` or stays silent (telnet) and is
//! still connected when the silence ends. Any doubt refuses. Refusals are answered with one
//! line and logged at a bounded rate, so a flood of them cannot rotate the service's own log
//! away or make the supervisor scan /proc for each.

use super::log_pump::LogWriter;
use super::peer::{self, Peer};
use super::protocol::{self, Refusal, Request};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a kill-port client that sends nothing (telnet) is given before it counts as a stop
/// request; `stasis stop` says `stop` at once and browsers send their request at once.
const FIRST_LINE_WAIT: Duration = Duration::from_millis(300);

/// Refusals logged per window; the rest are counted and summed up in one line.
const LOGGED_PER_WINDOW: u32 = 5;
const WINDOW: Duration = Duration::from_secs(60);

/// Who may stop the service through its kill port.
pub(super) struct KillPortPolicy {
    pub name: String,
    /// root, the service user and `kill_port_users`.
    pub allowed: Vec<u32>,
    pub log: LogWriter,
    refusals: Mutex<RefusalRate>,
}

impl KillPortPolicy {
    pub fn new(name: String, allowed: Vec<u32>, log: LogWriter) -> KillPortPolicy {
        KillPortPolicy { name, allowed, log, refusals: Mutex::new(RefusalRate::default()) }
    }

    /// Logs a refusal unless the window's share is used up. `what` is called only for a line
    /// that is written: it may cost a scan of /proc.
    fn refused(&self, what: impl FnOnce() -> String) {
        let now = Instant::now();
        let verdict = self.refusals.lock().unwrap_or_else(|p| p.into_inner()).admit(now);
        if let Some(suppressed) = verdict.summary {
            self.log.note(&format!("{suppressed} more kill-port refusals were not logged in the last minute"));
        }
        if verdict.log {
            self.log.note(&what());
        }
    }
}

/// A fixed-window counter of logged refusals.
#[derive(Debug, Default)]
struct RefusalRate {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

struct RateVerdict {
    log: bool,
    /// How many went unlogged in the window that just ended, when any did.
    summary: Option<u64>,
}

impl RefusalRate {
    fn admit(&mut self, now: Instant) -> RateVerdict {
        let mut summary = None;
        if self.window_start.is_none_or(|start| now.duration_since(start) >= WINDOW) {
            summary = (self.suppressed > 0).then_some(self.suppressed);
            *self = RefusalRate { window_start: Some(now), logged: 0, suppressed: 0 };
        }
        let log = self.logged < LOGGED_PER_WINDOW;
        if log {
            self.logged += 1;
        } else {
            self.suppressed += 1;
        }
        RateVerdict { log, summary }
    }
}

/// Why a connection did not stop the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Denied {
    /// No live socket of a process at the other end (closed, reset, time-wait, not found).
    NoOwner,
    NotAllowed(Peer),
    Request(Refusal),
    /// The client closed the connection without asking for anything.
    Closed,
    /// It started a line, then never finished it.
    Unfinished,
}

/// Lets the connection through only from a live, allowed peer that asks to stop; otherwise
/// answers one `refused:` line (when the client can still read it) and logs it.
pub(super) async fn admit(mut stream: TcpStream, from: SocketAddr, p: &KillPortPolicy) -> Option<TcpStream> {
    let local = stream.local_addr().ok()?;
    let denied = match check_peer(local, from, p) {
        Err(d) => Some(d),
        Ok(owner) => match read_request(&mut stream).await {
            Err(d) => Some(d),
            // The silence proved nothing by itself: the client must still be there, the same socket.
            Ok(()) => match check_peer(local, from, p) {
                Ok(now) if now.inode == owner.inode => None,
                Ok(_) => Some(Denied::NoOwner),
                Err(d) => Some(d),
            },
        },
    };
    let Some(denied) = denied else { return Some(stream) };
    p.refused(|| log_line(denied, from, &p.name));
    let reply = match denied {
        Denied::NoOwner => format!("refused: could not tell who is connecting, so {} is not stopped\n", p.name),
        Denied::NotAllowed(w) => protocol::refused_uid(w.uid, &p.name),
        Denied::Request(why) => protocol::refused_request(why, &p.name),
        Denied::Closed | Denied::Unfinished => protocol::refused_request(Refusal::Unknown, &p.name),
    };
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Closing with unread bytes makes the kernel reset the connection, and the client would
    // lose the reply: read what it sent, within bounds, before the close.
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_WAIT, drain).await;
    None
}

/// How long a refused client's remaining bytes are read before the connection is closed.
const DRAIN_WAIT: Duration = Duration::from_millis(200);

fn check_peer(local: SocketAddr, from: SocketAddr, p: &KillPortPolicy) -> Result<Peer, Denied> {
    match peer::lookup(local, from) {
        Some(w) if !w.is_live() => Err(Denied::NoOwner),
        Some(w) if p.allowed.contains(&w.uid) => Ok(w),
        Some(w) => Err(Denied::NotAllowed(w)),
        None => Err(Denied::NoOwner),
    }
}

/// Reads until the client has said `stop`, refused, or stayed silent for the whole wait.
async fn read_request(stream: &mut TcpStream) -> Result<(), Denied> {
    let deadline = tokio::time::Instant::now() + FIRST_LINE_WAIT;
    let mut sent = [0u8; protocol::FIRST_BYTES];
    let mut n = 0;
    loop {
        let read = match tokio::time::timeout_at(deadline, stream.read(&mut sent[n..])).await {
            Ok(read) => read,
            // Silence: an operator with telnet. Half a line: refused.
            Err(_) if n == 0 => return Ok(()),
            Err(_) => return Err(Denied::Unfinished),
        };
        match read {
            Ok(0) | Err(_) if n == 0 => return Err(Denied::Closed),
            Ok(0) | Err(_) => return Err(Denied::Unfinished),
            Ok(got) => n += got,
        }
        match protocol::classify(&sent[..n]) {
            Request::Stop => return Ok(()),
            Request::Refused(why) => return Err(Denied::Request(why)),
            Request::Partial if n < sent.len() => {}
            Request::Partial => return Err(Denied::Unfinished),
        }
    }
}

fn log_line(denied: Denied, from: SocketAddr, name: &str) -> String {
    match denied {
        Denied::NotAllowed(w) => {
            let pid = peer::pid_of_socket(w.inode).map_or_else(|| "unknown".to_string(), |p| p.to_string());
            format!("refused a kill-port connection from uid {} (pid {pid}, {from}): not allowed to stop {name}", w.uid)
        }
        Denied::NoOwner => format!(
            "refused a kill-port connection from {from}: no live socket of a process was found at its end (closed at once, or reset)"
        ),
        Denied::Request(Refusal::Tls) => format!("refused a TLS handshake on the kill port from {from}"),
        Denied::Request(Refusal::Http) => format!("refused an HTTP request on the kill port from {from}"),
        Denied::Request(Refusal::Unknown) => {
            format!("refused a kill-port connection from {from}: it sent something other than \"stop\"")
        }
        Denied::Closed => format!("refused a kill-port connection from {from}: it closed without asking for anything"),
        Denied::Unfinished => format!("refused a kill-port connection from {from}: it never finished its line"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_a_bounded_rate_and_summed_up() {
        let mut rate = RefusalRate::default();
        let t0 = Instant::now();
        let logged = (0..100).filter(|_| rate.admit(t0).log).count();
        assert_eq!(logged, LOGGED_PER_WINDOW as usize);
        let next = rate.admit(t0 + WINDOW);
        assert!(next.log);
        assert_eq!(next.summary, Some(100 - u64::from(LOGGED_PER_WINDOW)));
        assert_eq!(rate.admit(t0 + WINDOW * 3).summary, None, "nothing suppressed since");
    }
}
