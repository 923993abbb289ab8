//! Admission on the kill port: who may stop the service, and what counts as asking. A stop
//! happens only for a client whose socket the kernel shows ESTABLISHED, owned by a process
//! (inode not 0) of an allowed uid, that sends the line `stop` or stays silent (telnet) and is
//! still connected when the silence ends. Any doubt refuses. Refusals are answered with one
//! line and logged at a bounded rate, so a flood of them cannot rotate the service's own log
//! away or make the supervisor scan /proc for each.
//!
//! Silence is judged twice. A few milliseconds of it let the dump begin; then, at CRIU's
//! `post-dump` (images written, the tree still frozen, nothing ended yet), a stop asked for by
//! silence alone stands only if the client is still there and has still sent nothing but (part
//! of) `stop` ([`StopGate`]). A browser that was slow to send its first bytes has sent them by
//! then: the dump is refused, CRIU resumes the service and the draft is discarded.

use super::log_pump::LogWriter;
use super::peer::{self, Peer};
use super::protocol::{self, Refusal, Request};
use crate::engine::dump::{Withdrawn, WithdrawnBy};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a kill-port client that sends nothing (telnet) is given before the stop's dump may
/// begin. `stasis stop` says `stop` at once; a browser, curl or a TLS client sends its first
/// bytes in the same breath as its handshake's last packet (microseconds on loopback), so 5 ms
/// tells them apart on any machine that is not badly loaded, and it is all a telnet stop pays.
/// A client slower than that is not trusted on this wait alone: the stop is asked again at
/// `post-dump`, tens of milliseconds to seconds later ([`StopGate`]), before anything ends.
const SILENCE_WAIT: Duration = Duration::from_millis(5);

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
    /// Admitted for its silence, it closed (or reset) the connection before the stop was done.
    Left,
}

/// How an admitted kill-port client asked for its stop.
pub(super) enum Ask {
    /// In words: the line `stop` (or a request on the root-only control socket). It stands
    /// whatever the client does next.
    Said,
    /// By staying silent through [`SILENCE_WAIT`]: it stands only while the client still is.
    Silent(SilentClient),
}

/// A client admitted for its silence, as the dump's `post-dump` sees it: its socket (a second
/// descriptor of it, read only by peeking, so the bytes stay for whoever reads them), where it
/// came from, and the policy whose log hears a refusal.
pub(super) struct SilentClient {
    socket: OwnedFd,
    from: SocketAddr,
    policy: Arc<KillPortPolicy>,
}

impl SilentClient {
    /// Why the client no longer asks for the stop, if it does not: it has sent something that is
    /// not on the way to the line `stop` (a TLS hello, an HTTP verb, any other byte), or closed
    /// the connection. Never waits.
    fn withdrawn(&self) -> Option<Denied> {
        use nix::sys::socket::{recv, MsgFlags};
        let mut sent = [0u8; protocol::FIRST_BYTES];
        match recv(self.socket.as_raw_fd(), &mut sent, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Err(nix::errno::Errno::EAGAIN) => None,
            Ok(0) | Err(_) => Some(Denied::Left),
            // `stop`, or a prefix of it typed so far: an operator's, still asking.
            Ok(n) => match protocol::classify(&sent[..n]) {
                Request::Stop | Request::Partial => None,
                Request::Refused(why) => Some(Denied::Request(why)),
            },
        }
    }
}

/// Who asked for the stopping dump under way, asked again at its `post-dump` ([`Self::check`]),
/// the last moment before CRIU ends the service. Shared by the event loop, which adds the
/// clients that join the stop, and the dump.
pub(super) struct StopGate {
    asks: Mutex<Vec<Ask>>,
    verdict: Mutex<Option<Withdrawn>>,
}

impl StopGate {
    pub fn new(asks: Vec<Ask>) -> StopGate {
        StopGate { asks: Mutex::new(asks), verdict: Mutex::new(None) }
    }

    pub fn add(&self, ask: Ask) {
        self.asks.lock().unwrap_or_else(|p| p.into_inner()).push(ask);
    }
}

impl crate::engine::dump::StopGate for StopGate {
    /// Err when nobody asks for the stop any more: each silent client's change of mind is logged
    /// as a kill-port refusal (at the bounded rate), and the verdict kept for [`Self::called_off`].
    /// One who said `stop`, or one still silent, is enough for the stop to stand.
    fn check(&self) -> Result<(), Withdrawn> {
        let asks = self.asks.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        for ask in asks.iter() {
            match ask {
                Ask::Said => return Ok(()),
                Ask::Silent(c) => match c.withdrawn() {
                    None => return Ok(()),
                    Some(why) => gone.push((c, why)),
                },
            }
        }
        let Some(&(first, why)) = gone.first() else { return Ok(()) };
        for &(c, why) in &gone {
            let name = &c.policy.name;
            c.policy.refused(|| {
                format!(
                    "{}; the stop it asked for by staying silent is called off and {name} keeps running",
                    log_line(why, c.from, name)
                )
            });
        }
        let by = match why {
            Denied::Request(Refusal::Tls) => WithdrawnBy::TlsHandshake,
            Denied::Request(Refusal::Http) => WithdrawnBy::HttpRequest,
            Denied::Left => WithdrawnBy::Leaving,
            _ => WithdrawnBy::OtherBytes,
        };
        let withdrawn = Withdrawn { from: first.from, by };
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner()) = Some(withdrawn);
        Err(withdrawn)
    }

    fn called_off(&self) -> Option<Withdrawn> {
        *self.verdict.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets the connection through only from a live, allowed peer that asks to stop, with how it
/// asked; otherwise answers one `refused:` line (when the client can still read it) and logs it.
pub(super) async fn admit(
    mut stream: TcpStream,
    from: SocketAddr,
    p: &Arc<KillPortPolicy>,
) -> Option<(TcpStream, Ask)> {
    let local = stream.local_addr().ok()?;
    let asked = match check_peer(local, from, p) {
        Err(d) => Err(d),
        Ok(owner) => match read_request(&mut stream).await {
            Err(d) => Err(d),
            Ok(Heard::Stop) => Ok(Ask::Said),
            // The silence proved nothing by itself: the client must still be there, the same socket.
            Ok(Heard::Silence) => match check_peer(local, from, p) {
                Ok(now) if now.inode == owner.inode => match stream.as_fd().try_clone_to_owned() {
                    Ok(socket) => Ok(Ask::Silent(SilentClient { socket, from, policy: p.clone() })),
                    Err(_) => Err(Denied::NoOwner),
                },
                Ok(_) => Err(Denied::NoOwner),
                Err(d) => Err(d),
            },
        },
    };
    let denied = match asked {
        Ok(ask) => return Some((stream, ask)),
        Err(d) => d,
    };
    p.refused(|| log_line(denied, from, &p.name));
    let reply = match denied {
        Denied::NoOwner => format!("refused: could not tell who is connecting, so {} is not stopped\n", p.name),
        Denied::NotAllowed(w) => protocol::refused_uid(w.uid, &p.name),
        Denied::Request(why) => protocol::refused_request(why, &p.name),
        Denied::Closed | Denied::Unfinished | Denied::Left => protocol::refused_request(Refusal::Unknown, &p.name),
    };
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
    drain(&mut stream).await;
    None
}

/// Closing with unread bytes makes the kernel reset the connection, and the client would lose
/// the reply: what it sent is read, within bounds, before the close.
pub(super) async fn drain(stream: &mut TcpStream) {
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

/// What an admitted client's first bytes were.
enum Heard {
    Stop,
    Silence,
}

/// Reads until the client has said `stop`, refused, or stayed silent for the whole wait.
async fn read_request(stream: &mut TcpStream) -> Result<Heard, Denied> {
    let deadline = tokio::time::Instant::now() + SILENCE_WAIT;
    let mut sent = [0u8; protocol::FIRST_BYTES];
    let mut n = 0;
    loop {
        let read = match tokio::time::timeout_at(deadline, stream.read(&mut sent[n..])).await {
            Ok(read) => read,
            // Silence: an operator with telnet. Half a line: refused.
            Err(_) if n == 0 => return Ok(Heard::Silence),
            Err(_) => return Err(Denied::Unfinished),
        };
        match read {
            Ok(0) | Err(_) if n == 0 => return Err(Denied::Closed),
            Ok(0) | Err(_) => return Err(Denied::Unfinished),
            Ok(got) => n += got,
        }
        match protocol::classify(&sent[..n]) {
            Request::Stop => return Ok(Heard::Stop),
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
        Denied::Left => format!("refused a kill-port connection from {from}: it closed the connection during the dump"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::dump::StopGate as _;

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

    /// A loopback connection: the client's end, and the supervisor's end as a silent asker.
    fn silent_pair(policy: &Arc<KillPortPolicy>) -> (std::net::TcpStream, Ask) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, from) = listener.accept().unwrap();
        (client, Ask::Silent(SilentClient { socket: OwnedFd::from(server), from, policy: policy.clone() }))
    }

    /// Asks the gate until it calls the stop off (the bytes or the close may take a moment to
    /// arrive), or gives up after `wait`.
    fn called_off(gate: &StopGate, wait: Duration) -> Option<Withdrawn> {
        let until = Instant::now() + wait;
        loop {
            match gate.check() {
                Err(w) => return Some(w),
                Ok(()) if Instant::now() > until => return None,
                Ok(()) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Loopback bytes arrive at once; these bound how long the test looks for them.
    const CHANGE: Duration = Duration::from_secs(5);
    const NO_CHANGE: Duration = Duration::from_millis(100);

    #[test]
    fn a_silent_stop_stands_only_while_its_client_stays_silent_or_says_stop() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("service.log");
        let log = LogWriter::open(&log_path, false, 1 << 20, 1).unwrap();
        let policy = Arc::new(KillPortPolicy::new("svc".into(), vec![0], log));

        let (_quiet, ask) = silent_pair(&policy);
        let gate = StopGate::new(vec![ask]);
        assert_eq!(gate.check(), Ok(()), "silence still asks");
        for typed in [&b"sto"[..], b"stop\r\n"] {
            let (mut operator, ask) = silent_pair(&policy);
            operator.write_all(typed).unwrap();
            let gate = StopGate::new(vec![ask]);
            assert_eq!(called_off(&gate, NO_CHANGE), None, "{typed:?} is on the way to the stop line");
        }
        for (sent, why) in [
            (&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], WithdrawnBy::HttpRequest),
            (b"\x16\x03\x01\x00\xa5\x01", WithdrawnBy::TlsHandshake),
            (b"\r\n", WithdrawnBy::OtherBytes),
        ] {
            let (mut browser, ask) = silent_pair(&policy);
            browser.write_all(sent).unwrap();
            let gate = StopGate::new(vec![ask]);
            let w = called_off(&gate, CHANGE).unwrap_or_else(|| panic!("{sent:?} calls the stop off"));
            assert_eq!(w.by, why);
            assert_eq!(gate.called_off(), Some(w), "the verdict is kept for the loop");
            // Someone who said `stop`, or a client still silent, keeps the stop.
            let (_quiet, still) = silent_pair(&policy);
            gate.add(still);
            assert_eq!(gate.check(), Ok(()));
            let said = StopGate::new(vec![]);
            let (mut browser, ask) = silent_pair(&policy);
            browser.write_all(sent).unwrap();
            said.add(ask);
            said.add(Ask::Said);
            assert_eq!(called_off(&said, NO_CHANGE), None);
        }
        let (leaver, ask) = silent_pair(&policy);
        drop(leaver);
        let gate = StopGate::new(vec![ask]);
        let w = called_off(&gate, CHANGE).expect("a client that left calls the stop off");
        assert_eq!(w.by, WithdrawnBy::Leaving);
        assert!(w.to_string().contains("closed the connection"), "{w}");

        let logged = std::fs::read_to_string(&log_path).unwrap();
        assert!(logged.contains("refused an HTTP request on the kill port from 127.0.0.1:"), "{logged}");
        assert!(logged.contains("refused a TLS handshake on the kill port"), "{logged}");
        assert!(
            logged.contains("the stop it asked for by staying silent is called off and svc keeps running"),
            "{logged}"
        );
    }
}
