//! The supervisor's event loop: turns connections, signals, dump completions and the service's
//! exit into [`Event`]s, runs them through the state machine and carries out its actions.

use super::checkpoint::{take_checkpoint, DumpProgress};
use super::context::Context;
use super::log_pump::LogWriter;
use super::protocol::{self, CheckpointReport};
use super::state::{next, Action, Event, State};
use crate::store::DumpKind;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

type Outcome = Result<CheckpointReport, String>;

struct Request {
    kind: DumpKind,
    reply: oneshot::Sender<Outcome>,
    /// Lines for the requester while it waits (a place in the host's dump queue).
    lines: mpsc::UnboundedSender<String>,
}

struct Waiter {
    reply: oneshot::Sender<Outcome>,
    lines: mpsc::UnboundedSender<String>,
}

/// Where requests come from: the kill port (checkpoint and stop) and the root-only control socket.
pub struct Listeners {
    pub kill_port: TcpListener,
    pub control: UnixListener,
}

pub struct LoopEnd {
    pub state: State,
}

/// How long to wait for a dumped service to disappear and its output to drain.
const FINISH_TIMEOUT: Duration = Duration::from_secs(15);

pub async fn run_loop(
    ctx: Arc<Context>,
    init_pid: Pid,
    listeners: Listeners,
    log: LogWriter,
    pump: tokio::task::JoinHandle<()>,
    on_change: impl Fn(State, Option<&str>),
    on_queued: impl Fn(bool),
) -> std::io::Result<LoopEnd> {
    let (req_tx, mut req_rx) = mpsc::channel::<Request>(16);
    // The loop's end waits until every connection has written its final lines.
    let connections = OpenConnections::default();
    let Listeners { kill_port, control } = listeners;
    let mut allowed = vec![0, ctx.service.uid];
    allowed.extend(&ctx.service.kill_port_uids);
    let policy = Arc::new(KillPortPolicy { name: ctx.service.name.clone(), allowed, log: log.clone() });
    tokio::spawn(accept_kill_port(kill_port, req_tx.clone(), policy, connections.clone()));
    tokio::spawn(accept_control(control, req_tx, ctx.service.name.clone(), connections.clone()));
    let (dump_tx, mut dump_rx) = mpsc::channel::<Outcome>(1);
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<DumpProgress>();
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The service's exit, as an event: a pidfd of its init becomes readable when it exits. SIGCHLD
    // alone can race with a restored root becoming our child; neither needs a timer, so an idle
    // supervisor never wakes up.
    let exited = crate::process::tree::pidfd(init_pid.as_raw())
        // SAFETY: the AsyncFd owns the pidfd, which nothing else uses or closes.
        .and_then(|fd| {
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
        });
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;

    let mut state = State::Running;
    let mut exit_message: Option<String> = None;
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut last_outcome: Option<Outcome> = None;

    loop {
        let mut request = None;
        let event = tokio::select! {
            Some(req) = req_rx.recv() => {
                let kind = req.kind;
                request = Some(req);
                Event::DumpRequested(kind)
            }
            Some(p) = progress_rx.recv() => {
                match p {
                    DumpProgress::Queued(line) => {
                        log.note(&line);
                        super::systemd::status(&line);
                        on_queued(true);
                        for w in &waiters {
                            let _ = w.lines.send(line.clone());
                        }
                    }
                    DumpProgress::Dumping => on_queued(false),
                    DumpProgress::Progress(line) => {
                        super::systemd::status(&line);
                        for w in &waiters {
                            let _ = w.lines.send(line.clone());
                        }
                    }
                }
                continue;
            }
            Some(outcome) = dump_rx.recv() => {
                let ok = outcome.is_ok();
                last_outcome = Some(outcome);
                if ok { Event::DumpSucceeded } else { Event::DumpFailed }
            }
            _ = sigchld.recv() => match reap(init_pid, &mut exit_message) { Some(e) => e, None => continue },
            _ = async { exited.as_ref().expect("guarded").readable().await.map(|mut g| g.clear_ready()) }, if exited.is_some() && exit_message.is_none() => {
                match reap(init_pid, &mut exit_message) { Some(e) => e, None => continue }
            }
            _ = sigterm.recv() => Event::Terminate,
            _ = sigint.recv() => Event::Terminate,
            _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                grace = None;
                Event::GraceExpired
            }
        };
        let (new_state, actions) = next(state, event);
        let mut finish = false;
        for action in actions {
            match action {
                Action::StartDump(kind) => {
                    tracing::debug!("loop: dump requested");
                    if let Some(req) = request.take() {
                        waiters.push(Waiter { reply: req.reply, lines: req.lines });
                    }
                    log.note(match kind {
                        DumpKind::Stop => "checkpoint requested through the kill port: dumping, then stopping",
                        DumpKind::KeepRunning => "checkpoint requested: dumping, the service keeps running",
                    });
                    super::systemd::status("saving a checkpoint");
                    let (ctx, tx, progress) = (ctx.clone(), dump_tx.clone(), progress_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let report = |p: DumpProgress| {
                            let _ = progress.send(p);
                        };
                        let outcome = take_checkpoint(&ctx, init_pid.as_raw(), kind, report);
                        let _ = tx.blocking_send(outcome);
                    });
                }
                Action::JoinDump => {
                    if let Some(req) = request.take() {
                        let _ = req.lines.send(protocol::joined(&ctx.service.name));
                        waiters.push(Waiter { reply: req.reply, lines: req.lines });
                    }
                }
                Action::RejectRequest => {
                    if let Some(req) = request.take() {
                        let why = match state {
                            State::Checkpointing { .. } => format!(
                                "a checkpoint of {} is already in progress; try again when it finishes",
                                ctx.service.name
                            ),
                            _ => format!("{} is shutting down", ctx.service.name),
                        };
                        let _ = req.reply.send(Err(why));
                    }
                }
                Action::ReplyToDumpWaiters => {
                    tracing::debug!("loop: dump finished");
                    let outcome = last_outcome.clone().unwrap_or_else(|| Err("no outcome".into()));
                    let ok = outcome.is_ok();
                    crate::store::counters::bump(&ctx.paths.root, |c| {
                        if ok {
                            c.checkpoints += 1
                        } else {
                            c.checkpoint_failures += 1
                        }
                    });
                    crate::metrics::write_file(&ctx.dirs, &ctx.host);
                    match &outcome {
                        Ok(r) => super::systemd::status(&format!("checkpoint {} saved", r.id)),
                        Err(e) => {
                            super::systemd::status(&format!("checkpoint failed: {}", e.lines().next().unwrap_or("")))
                        }
                    }
                    match &outcome {
                        Ok(r) => {
                            log.note(&format!(
                                "checkpoint {} saved ({} bytes) in {}",
                                r.id,
                                r.size_bytes,
                                r.dir.display()
                            ));
                            for n in &r.notes {
                                log.note(n);
                            }
                        }
                        Err(e) => log.note(&format!("checkpoint failed: {e}")),
                    }
                    for w in waiters.drain(..) {
                        let _ = w.reply.send(outcome.clone());
                    }
                    // A stopping supervisor purges once it has let go of its lock.
                    if new_state == State::Running {
                        let purge = ctx.clone();
                        tokio::task::spawn_blocking(move || purge.store.purge_removed());
                    }
                    tracing::debug!("loop: replied");
                }
                Action::TerminateService => {
                    super::systemd::stopping("stopping without a checkpoint");
                    log.note(&format!(
                        "stopping without a checkpoint: SIGTERM, SIGKILL after {} s",
                        ctx.service.stop_timeout.as_secs()
                    ));
                    let _ = kill(init_pid, Signal::SIGTERM);
                    grace = Some(Box::pin(tokio::time::sleep(ctx.service.stop_timeout)));
                }
                Action::KillService => {
                    log.note("grace period over: SIGKILL");
                    let _ = kill(init_pid, Signal::SIGKILL);
                }
                Action::Finish => finish = true,
            }
        }
        if new_state != state {
            let msg = match new_state {
                State::Stopped if matches!(state, State::Checkpointing { .. }) => last_outcome
                    .as_ref()
                    .and_then(|o| o.as_ref().ok())
                    .map(|r| format!("stopped after checkpoint {}", r.id)),
                State::Failed | State::Stopped => exit_message.clone(),
                _ => None,
            };
            on_change(new_state, msg.as_deref());
        }
        state = new_state;
        if finish {
            break;
        }
    }

    // The service may still be on its way out (CRIU kills it after the hook) and its last
    // output in the pipe: wait for both, so nothing is lost and no zombie stays.
    let deadline = tokio::time::Instant::now() + FINISH_TIMEOUT;
    while reap(init_pid, &mut exit_message).is_none() && exit_message.is_none() {
        tokio::select! {
            _ = async { exited.as_ref().expect("guarded").readable().await.map(|mut g| g.clear_ready()) }, if exited.is_some() => {}
            _ = sigchld.recv() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if exit_message.is_none() {
        let _ = kill(init_pid, Signal::SIGKILL);
        let _ = waitpid(init_pid, None);
    }
    if tokio::time::timeout(FINISH_TIMEOUT, pump).await.is_err() {
        log.note("the service's output did not reach EOF in time; some of its last lines may be missing");
    }
    let message: String = match state {
        State::Stopped => last_outcome
            .clone()
            .and_then(|o| o.ok())
            .map(|r| format!("stopped after checkpoint {}", r.id))
            .or(exit_message)
            .unwrap_or_else(|| "stopped".into()),
        _ => exit_message.unwrap_or_else(|| "exited".into()),
    };
    // Requests that came in while the dump finished still get an answer: the checkpoint they
    // asked for if it was taken, else why not. New ones are turned away at once.
    let late_outcome = match (&state, &last_outcome) {
        (State::Stopped, Some(Ok(r))) => Ok(r.clone()),
        _ => Err(format!("{} is not running any more", ctx.service.name)),
    };
    loop {
        tokio::select! {
            Some(req) = req_rx.recv() => {
                if late_outcome.is_ok() {
                    let _ = req.lines.send(protocol::joined(&ctx.service.name));
                }
                let _ = req.reply.send(late_outcome.clone());
            }
            _ = connections.all_closed() => break,
            _ = tokio::time::sleep_until(deadline + FINISH_TIMEOUT) => break,
        }
    }
    tracing::debug!("loop: exiting");
    log.note(&format!("supervisor exiting: {message}"));
    super::systemd::stopping(&message);
    Ok(LoopEnd { state })
}

/// Counts the connections being served, so the loop's end can wait for them without a timer.
#[derive(Clone, Default)]
struct OpenConnections(Arc<OpenCount>);

#[derive(Default)]
struct OpenCount {
    n: std::sync::atomic::AtomicUsize,
    closed: tokio::sync::Notify,
}

/// One connection being served; dropping it closes the count.
struct Open(Arc<OpenCount>);

impl OpenConnections {
    fn open(&self) -> Open {
        self.0.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Open(self.0.clone())
    }

    async fn all_closed(&self) {
        loop {
            // Created before the check, so a close between the two still wakes it.
            let closed = self.0.closed.notified();
            if self.0.n.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            closed.await;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.0.closed.notify_waiters();
        }
    }
}

/// Collects the service's init if it has exited.
fn reap(init_pid: Pid, exit_message: &mut Option<String>) -> Option<Event> {
    if exit_message.is_some() {
        return None;
    }
    let msg = match waitpid(init_pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => format!("the service exited with status {code}"),
        Ok(WaitStatus::Signaled(_, sig, _)) => format!("the service was killed by {sig}"),
        Ok(_) => return None,
        Err(nix::errno::Errno::ECHILD) => "the service exited".to_string(),
        Err(_) => return None,
    };
    *exit_message = Some(msg);
    Some(Event::ServiceExited)
}

/// Who may stop the service through its kill port.
struct KillPortPolicy {
    name: String,
    /// root, the service user and `kill_port_users`.
    allowed: Vec<u32>,
    log: LogWriter,
}

/// How long a kill-port client that sends nothing (telnet) is given before it counts as a stop
/// request; `stasis stop` says `stop` at once and browsers send their request at once.
const FIRST_LINE_WAIT: Duration = Duration::from_millis(300);

async fn accept_kill_port(
    listener: TcpListener,
    tx: mpsc::Sender<Request>,
    policy: Arc<KillPortPolicy>,
    connections: OpenConnections,
) {
    loop {
        if let Ok((stream, peer)) = listener.accept().await {
            tracing::debug!("kill port: accepted");
            let (tx, policy, open) = (tx.clone(), policy.clone(), connections.open());
            tokio::spawn(async move {
                if let Some(stream) = admit(stream, peer, &policy).await {
                    serve(stream, DumpKind::Stop, tx, policy.name.clone()).await;
                }
                drop(open);
            });
        }
    }
}

/// Lets the connection through only from an allowed uid and when it is not an HTTP request;
/// otherwise answers one `refused:` line, logs who it was, and nothing happens.
async fn admit(
    mut stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    p: &KillPortPolicy,
) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncReadExt;
    let who = stream.local_addr().ok().and_then(|local| super::peer::lookup(local, peer));
    let verdict = match who {
        Some(w) if p.allowed.contains(&w.uid) => None,
        Some(w) => {
            let pid = super::peer::pid_of_socket(w.inode).map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
            p.log.note(&format!(
                "refused a kill-port connection from uid {} (pid {pid}, {peer}): not allowed to stop {}",
                w.uid, p.name
            ));
            Some(protocol::refused_uid(w.uid, &p.name))
        }
        None => {
            p.log.note(&format!("refused a kill-port connection from {peer}: its owner could not be found"));
            Some(format!("refused: could not tell who is connecting, so {} is not stopped\n", p.name))
        }
    };
    if let Some(line) = verdict {
        let _ = stream.write_all(line.as_bytes()).await;
        return None;
    }
    let mut first = [0u8; 64];
    let n = match tokio::time::timeout(FIRST_LINE_WAIT, stream.read(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return None,
        // Nothing sent: an operator with telnet.
        Err(_) => 0,
    };
    if protocol::looks_like_http(&first[..n]) {
        p.log.note(&format!("refused an HTTP request on the kill port from {peer}"));
        let _ = stream.write_all(protocol::refused_http(&p.name).as_bytes()).await;
        return None;
    }
    Some(stream)
}

async fn accept_control(listener: UnixListener, tx: mpsc::Sender<Request>, name: String, connections: OpenConnections) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (tx, name, open) = (tx.clone(), name.clone(), connections.open());
        tokio::spawn(async move {
            let _open = open;
            // The socket sits in the root-only run dir; its peer must be root all the same.
            if stream.peer_cred().map(|c| c.uid()).ok() != Some(0) {
                let (_, mut wr) = stream.into_split();
                let _ = wr.write_all(b"ERROR refused: only root may ask for a checkpoint\n").await;
                return;
            }
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), BufReader::new(rd).read_line(&mut line)).await;
            if !matches!(read, Ok(Ok(_))) || line.trim() != protocol::CHECKPOINT_COMMAND {
                let _ = wr
                    .write_all(
                        format!(
                            "ERROR unknown command {:?}; the only command is {}\n",
                            line.trim(),
                            protocol::CHECKPOINT_COMMAND
                        )
                        .as_bytes(),
                    )
                    .await;
                return;
            }
            serve(wr, DumpKind::KeepRunning, tx, name).await;
        });
    }
}

/// One request: the announcement at once, then the outcome.
async fn serve<W: tokio::io::AsyncWrite + Unpin>(mut out: W, kind: DumpKind, tx: mpsc::Sender<Request>, name: String) {
    let first = match kind {
        DumpKind::Stop => protocol::announce_stop(&name),
        DumpKind::KeepRunning => protocol::announce_checkpoint(&name),
    };
    let _ = out.write_all(first.as_bytes()).await;
    let _ = out.flush().await;
    let (reply, mut rx) = oneshot::channel();
    let (lines, mut lines_rx) = mpsc::unbounded_channel();
    let outcome = match tx.send(Request { kind, reply, lines }).await {
        Ok(()) => loop {
            tokio::select! {
                Some(line) = lines_rx.recv() => {
                    let _ = out.write_all(format!("{line}\n").as_bytes()).await;
                    let _ = out.flush().await;
                }
                outcome = &mut rx => {
                    // Lines sent before the outcome come first, even if both were ready at once.
                    while let Ok(line) = lines_rx.try_recv() {
                        let _ = out.write_all(format!("{line}\n").as_bytes()).await;
                    }
                    break outcome.unwrap_or_else(|_| Err("the supervisor is exiting".into()));
                }
            }
        },
        Err(_) => Err("the supervisor is exiting".into()),
    };
    let _ = out.write_all(protocol::final_line(&outcome).as_bytes()).await;
    let _ = out.shutdown().await;
}
