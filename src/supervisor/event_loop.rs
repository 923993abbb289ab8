//! The supervisor's event loop: turns connections, signals, dump completions and the service's
//! exit into [`Event`]s, runs them through the state machine and carries out its actions.

use super::checkpoint::{take_checkpoint, DumpProgress};
use super::context::Context;
use super::kill_port::{self, admit, Ask, KillPortPolicy, StopGate};
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
    /// `stasis doctor`: a dump that is thrown away.
    dry: bool,
    reply: oneshot::Sender<Outcome>,
    /// Lines for the requester while it waits (a place in the host's dump queue).
    lines: mpsc::UnboundedSender<String>,
    /// How it asked: a stop asked for by a kill-port client's silence alone is asked again at
    /// the dump's `post-dump` (kill_port::StopGate).
    ask: Ask,
}

/// A `stop --no-checkpoint`, answered once the service is gone (Ok: how it ended) or with why
/// it was not stopped that way.
type TerminateReply = oneshot::Sender<Result<String, String>>;

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
    /// What happened, in words, for the log and the status.
    pub message: String,
    /// How the service's init ended, when it did.
    pub exit: Option<super::restart::Exit>,
    /// The outcome of the last dump, if any.
    pub last_outcome: Option<Outcome>,
}

/// What lives as long as the supervisor, across restarts of the service: the requests from the
/// kill port and the control socket, the signals, and the count of open connections.
pub struct Channels {
    req_rx: mpsc::Receiver<Request>,
    term_rx: mpsc::Receiver<TerminateReply>,
    connections: OpenConnections,
    sigchld: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

impl Channels {
    /// Starts accepting on both listeners.
    pub fn open(ctx: &Context, listeners: Listeners, log: &LogWriter) -> std::io::Result<Channels> {
        let (req_tx, req_rx) = mpsc::channel::<Request>(16);
        let (term_tx, term_rx) = mpsc::channel::<TerminateReply>(16);
        let connections = OpenConnections::default();
        let Listeners { kill_port, control } = listeners;
        let mut allowed = vec![0, ctx.service.uid];
        allowed.extend(&ctx.service.kill_port_uids);
        let policy = Arc::new(KillPortPolicy::new(ctx.service.name.clone(), allowed, log.clone()));
        tokio::spawn(accept_kill_port(kill_port, req_tx.clone(), policy, connections.clone()));
        let control_ctx = ControlContext {
            name: ctx.service.name.clone(),
            grace: ctx.service.stop_timeout,
            requests: req_tx,
            terminate: term_tx,
        };
        tokio::spawn(accept_control(control, control_ctx, connections.clone()));
        Ok(Channels {
            req_rx,
            term_rx,
            connections,
            sigchld: signal(SignalKind::child())?,
            sigterm: signal(SignalKind::terminate())?,
            sigint: signal(SignalKind::interrupt())?,
        })
    }

    /// The supervisor's last act: requests that came in while it finished still get an answer
    /// (`late`: the checkpoint they asked for if it was taken, else why not), and every
    /// connection is let finish its last lines.
    pub async fn close(&mut self, name: &str, late: Outcome) {
        let deadline = tokio::time::Instant::now() + FINISH_TIMEOUT;
        loop {
            tokio::select! {
                Some(req) = self.req_rx.recv() => {
                    if late.is_ok() {
                        let _ = req.lines.send(protocol::joined(name));
                    }
                    let _ = req.reply.send(late.clone());
                }
                // Whatever ended this supervisor, the service is gone, which is what was asked.
                Some(reply) = self.term_rx.recv() => {
                    let _ = reply.send(Ok(format!("{name} is not running any more")));
                }
                _ = self.connections.all_closed() => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
    }

    /// Sleeps `delay` before a restart. A stop or checkpoint asked for meanwhile is answered
    /// (there is no service to dump) and ends the wait: Err is the reason the supervisor ends.
    pub async fn wait_to_restart(&mut self, name: &str, delay: Duration) -> Result<(), String> {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(()),
                Some(req) = self.req_rx.recv() => {
                    let why = format!("{name} is not running: it exited and was waiting to be restarted; it will not be");
                    let _ = req.reply.send(Err(why.clone()));
                    if req.kind == DumpKind::Stop {
                        return Err(format!("stopped while waiting to restart: {why}"));
                    }
                }
                Some(reply) = self.term_rx.recv() => {
                    let _ = reply.send(Ok(format!("{name} was waiting to be restarted; it will not be")));
                    return Err("stopped without a checkpoint while waiting to restart".into());
                }
                _ = self.sigterm.recv() => return Err("stopped by SIGTERM while waiting to restart".into()),
                _ = self.sigint.recv() => return Err("stopped by SIGINT while waiting to restart".into()),
                // Children from an earlier run are reaped by their subreaper: nothing to do.
                _ = self.sigchld.recv() => {}
            }
        }
    }
}

/// How long to wait for a dumped service to disappear and its output to drain.
const FINISH_TIMEOUT: Duration = Duration::from_secs(15);

/// One run of the service: from started to exited (or dumped and gone). Returns once its init
/// is reaped and its output drained.
pub async fn run_loop(
    ctx: Arc<Context>,
    init_pid: Pid,
    ch: &mut Channels,
    log: LogWriter,
    pump: tokio::task::JoinHandle<()>,
    on_change: impl Fn(State, Option<&str>),
    on_queued: impl Fn(bool),
) -> std::io::Result<LoopEnd> {
    let Channels { req_rx, term_rx, sigchld, sigterm, sigint, .. } = ch;
    let (dump_tx, mut dump_rx) = mpsc::channel::<Outcome>(1);
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<DumpProgress>();
    // `checkpoint_every`: one timer, armed while the service runs; none without the setting.
    let every = ctx.service.checkpoint_every;
    let mut periodic = every.map(|d| Box::pin(tokio::time::sleep(d)));
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
    let mut exit: Option<super::restart::Exit> = None;
    let mut waiters: Vec<Waiter> = Vec::new();
    // Stops that came during a dump that leaves the service running: they get the stop after it.
    let mut queued: Vec<Waiter> = Vec::new();
    let mut queued_asks: Vec<Ask> = Vec::new();
    // Who asked for the stopping dump under way, asked again at its post-dump.
    let mut gate: Option<Arc<StopGate>> = None;
    let mut last_outcome: Option<Outcome> = None;
    let mut terminators: Vec<TerminateReply> = Vec::new();
    // Set once SIGTERM went to the service: its exit is then the stop, not a failure.
    let mut terminated = false;

    loop {
        let mut request = None;
        let event = tokio::select! {
            Some(req) = req_rx.recv() => {
                let (kind, dry) = (req.kind, req.dry);
                request = Some(req);
                if dry { Event::DoctorRequested } else { Event::DumpRequested(kind) }
            }
            Some(reply) = term_rx.recv() => {
                log.note("stop without a checkpoint requested (stasis stop --no-checkpoint)");
                terminators.push(reply);
                Event::Terminate
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
            _ = sigchld.recv() => match reap(init_pid, &mut exit_message, &mut exit) { Some(e) => e, None => continue },
            _ = async { exited.as_ref().expect("guarded").readable().await.map(|mut g| g.clear_ready()) }, if exited.is_some() && exit_message.is_none() => {
                match reap(init_pid, &mut exit_message, &mut exit) { Some(e) => e, None => continue }
            }
            _ = async { periodic.as_mut().expect("guarded").await }, if periodic.is_some() && state == State::Running => {
                periodic = None;
                match super::checkpoint::room_for_periodic(&ctx, init_pid.as_raw()) {
                    Ok(()) => Event::PeriodicDue,
                    Err(why) => {
                        log.note(&format!("periodic checkpoint skipped: {why}; the service keeps running and the previous checkpoint is kept"));
                        crate::store::counters::bump(&ctx.paths.root, |c| c.periodic_skipped += 1);
                        super::metrics::write_file(&ctx.dirs, &ctx.host);
                        periodic = every.map(|d| Box::pin(tokio::time::sleep(d)));
                        continue;
                    }
                }
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
                    let mut asks = std::mem::take(&mut queued_asks);
                    if let Some(req) = request.take() {
                        asks.push(req.ask);
                        waiters.push(Waiter { reply: req.reply, lines: req.lines });
                    }
                    waiters.append(&mut queued);
                    gate = (kind == DumpKind::Stop).then(|| Arc::new(StopGate::new(asks)));
                    log.note(match kind {
                        DumpKind::Stop => "checkpoint requested through the kill port: dumping, then stopping",
                        DumpKind::KeepRunning => "checkpoint requested: dumping, the service keeps running",
                        DumpKind::Periodic => {
                            "periodic checkpoint (checkpoint_every): dumping, the service keeps running"
                        }
                    });
                    super::systemd::status("saving a checkpoint");
                    let (ctx, tx, progress, gate) = (ctx.clone(), dump_tx.clone(), progress_tx.clone(), gate.clone());
                    tokio::task::spawn_blocking(move || {
                        let report = |p: DumpProgress| {
                            let _ = progress.send(p);
                        };
                        let outcome = take_checkpoint(&ctx, init_pid.as_raw(), kind, false, gate.as_deref(), report)
                            .map_err(|e| e.to_string());
                        // The clients' second descriptors close before they hear the outcome.
                        drop(gate);
                        let _ = tx.blocking_send(outcome);
                    });
                }
                Action::StartDryRun => {
                    if let Some(req) = request.take() {
                        waiters.push(Waiter { reply: req.reply, lines: req.lines });
                    }
                    log.note("doctor: a dry-run dump (the service keeps running; nothing is kept)");
                    let (ctx, tx, progress) = (ctx.clone(), dump_tx.clone(), progress_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let report = |p: DumpProgress| {
                            let _ = progress.send(p);
                        };
                        let outcome =
                            take_checkpoint(&ctx, init_pid.as_raw(), DumpKind::KeepRunning, true, None, report)
                                .map_err(|e| e.to_string());
                        let _ = tx.blocking_send(outcome);
                    });
                }
                Action::QueueRequest => {
                    if let Some(req) = request.take() {
                        let _ = req.lines.send(format!(
                            "Waiting: a checkpoint of {} that keeps it running is under way; the stop follows it",
                            ctx.service.name
                        ));
                        queued_asks.push(req.ask);
                        queued.push(Waiter { reply: req.reply, lines: req.lines });
                    }
                }
                Action::JoinDump => {
                    if let Some(req) = request.take() {
                        let _ = req.lines.send(protocol::joined(&ctx.service.name));
                        if let Some(g) = &gate {
                            g.add(req.ask);
                        }
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
                    let dry = outcome.as_ref().is_ok_and(|r| r.dry);
                    // A stop its silent client called off is a refusal, logged as one by the gate.
                    let called_off = gate.take().and_then(|g| g.called_off()).is_some();
                    // A dry run is not a checkpoint, and its failure is what was asked about.
                    crate::store::counters::bump(&ctx.paths.root, |c| {
                        if dry || called_off {
                            return;
                        }
                        if ok {
                            c.checkpoints += 1
                        } else {
                            c.checkpoint_failures += 1
                        }
                    });
                    super::metrics::write_file(&ctx.dirs, &ctx.host);
                    match &outcome {
                        Ok(r) if r.dry => super::systemd::status("doctor: a checkpoint would work now"),
                        Ok(r) => super::systemd::status(&format!("checkpoint {} saved", r.id)),
                        Err(_) if called_off => {
                            super::systemd::status("running: a stop through the kill port was called off")
                        }
                        Err(e) => {
                            super::systemd::status(&format!("checkpoint failed: {}", e.lines().next().unwrap_or("")))
                        }
                    }
                    match &outcome {
                        Ok(r) if r.dry => log.note(&format!(
                            "doctor: a checkpoint would work now ({} bytes dumped, thrown away)",
                            r.size_bytes
                        )),
                        Ok(r) => {
                            // Before anyone hears of it: `gc` deletes only tables recorded as ours.
                            if let Err(e) = crate::criu::network_lock::record_owner(
                                &ctx.dirs.state_dir,
                                &ctx.service.name,
                                &r.id,
                                &r.dir.join(crate::criu::DUMP_LOG),
                            ) {
                                log.note(&format!("warning: {e}; `stasis gc` will not delete its table"));
                            }
                            log.note(&format!(
                                "checkpoint {} saved ({} bytes) in {}",
                                r.id,
                                r.size_bytes,
                                r.dir.display()
                            ));
                            for n in &r.notes {
                                log.note(n);
                            }
                            if let (Some(max), Some(froze)) = (ctx.service.max_freeze, r.freeze) {
                                if froze > max {
                                    log.note(&format!(
                                        "warning: checkpoint {} froze the service for {} ms, more than max_freeze_ms ({} ms)",
                                        r.id,
                                        froze.as_millis(),
                                        max.as_millis()
                                    ));
                                    crate::store::counters::bump(&ctx.paths.root, |c| c.freeze_over_budget += 1);
                                }
                            }
                        }
                        Err(_) if called_off => {}
                        Err(e) => log.note(&format!("checkpoint failed: {e}")),
                    }
                    if new_state == State::Running {
                        periodic = every.map(|d| Box::pin(tokio::time::sleep(d)));
                    }
                    for w in waiters.drain(..) {
                        let _ = w.reply.send(outcome.clone());
                    }
                    // A stopping supervisor purges once it has let go of its lock.
                    if new_state == State::Running {
                        let purge = ctx.clone();
                        std::thread::spawn(move || purge.store.purge_removed());
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
                    terminated = true;
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
                State::Stopped if terminated => exit_message.as_ref().map(|m| without_checkpoint(m)),
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
    while reap(init_pid, &mut exit_message, &mut exit).is_none() && exit_message.is_none() {
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
            .or_else(|| exit_message.as_ref().filter(|_| terminated).map(|m| without_checkpoint(m)))
            .or(exit_message)
            .unwrap_or_else(|| "stopped".into()),
        _ => exit_message.unwrap_or_else(|| "exited".into()),
    };
    for w in queued {
        let _ = w.reply.send(Err(format!("{} exited before it could be stopped with a checkpoint", ctx.service.name)));
    }
    for t in terminators {
        let answer = match state {
            State::Stopped => Ok(message.clone()),
            _ => Err(format!("{} exited by itself before it could be stopped: {message}", ctx.service.name)),
        };
        let _ = t.send(answer);
    }
    tracing::debug!("loop: service gone");
    Ok(LoopEnd { state, exit, last_outcome, message })
}

fn without_checkpoint(exit: &str) -> String {
    format!("stopped without a checkpoint ({exit})")
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
fn reap(init_pid: Pid, exit_message: &mut Option<String>, exit: &mut Option<super::restart::Exit>) -> Option<Event> {
    use super::restart::Exit;
    if exit_message.is_some() {
        return None;
    }
    let (msg, how) = match waitpid(init_pid, Some(WaitPidFlag::WNOHANG)) {
        // The init exits with its command's status, a signal as 128 + N.
        Ok(WaitStatus::Exited(_, code)) => {
            let how = Exit::from_init_code(code);
            let signal = matches!(how, Exit::Signal(_)).then(|| format!(" (its command {})", how.describe()));
            (format!("the service exited with status {code}{}", signal.unwrap_or_default()), how)
        }
        // The init itself was killed, from outside the namespace.
        Ok(WaitStatus::Signaled(_, sig, _)) => (format!("the service was killed by {sig}"), Exit::Signal(sig as i32)),
        Ok(_) => return None,
        Err(nix::errno::Errno::ECHILD) => ("the service exited".to_string(), Exit::Unknown),
        Err(_) => return None,
    };
    *exit_message = Some(msg);
    *exit = Some(how);
    Some(Event::ServiceExited)
}

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
                if let Some((mut stream, ask)) = admit(stream, peer, &policy).await {
                    let outcome = serve(&mut stream, DumpKind::Stop, false, ask, tx, policy.name.clone()).await;
                    // A client whose stop was called off may have sent bytes nobody read.
                    if outcome.is_err() {
                        kill_port::drain(&mut stream).await;
                    }
                }
                drop(open);
            });
        }
    }
}

/// What a control-socket connection may ask of the loop.
#[derive(Clone)]
struct ControlContext {
    name: String,
    /// `stop_timeout_secs`, for the announcement of a stop without a checkpoint.
    grace: Duration,
    requests: mpsc::Sender<Request>,
    terminate: mpsc::Sender<TerminateReply>,
}

async fn accept_control(listener: UnixListener, cc: ControlContext, connections: OpenConnections) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (cc, open) = (cc.clone(), connections.open());
        tokio::spawn(async move {
            let _open = open;
            // The socket sits in the root-only run dir; its peer must be root all the same.
            if stream.peer_cred().map(|c| c.uid()).ok() != Some(0) {
                let (_, mut wr) = stream.into_split();
                let refused = protocol::Verdict::failed("refused: only root may ask for a checkpoint");
                let _ = wr.write_all(format!("{refused}\n").as_bytes()).await;
                return;
            }
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), BufReader::new(rd).read_line(&mut line)).await;
            let dry = match line.trim() {
                protocol::CHECKPOINT_COMMAND if matches!(read, Ok(Ok(_))) => false,
                protocol::DOCTOR_COMMAND if matches!(read, Ok(Ok(_))) => true,
                protocol::TERMINATE_COMMAND if matches!(read, Ok(Ok(_))) => {
                    serve_terminate(wr, &cc).await;
                    return;
                }
                other => {
                    let _ = wr
                        .write_all(
                            format!(
                                "{}\n",
                                protocol::Verdict::failed(&format!(
                                    "unknown command {other:?}; the commands are {}, {} and {}",
                                    protocol::CHECKPOINT_COMMAND,
                                    protocol::DOCTOR_COMMAND,
                                    protocol::TERMINATE_COMMAND
                                ))
                            )
                            .as_bytes(),
                        )
                        .await;
                    return;
                }
            };
            let _ = serve(wr, DumpKind::KeepRunning, dry, Ask::Said, cc.requests, cc.name).await;
        });
    }
}

/// `stop --no-checkpoint`: the announcement at once, then how the service ended.
async fn serve_terminate<W: tokio::io::AsyncWrite + Unpin>(mut out: W, cc: &ControlContext) {
    let _ = out.write_all(protocol::announce_terminate(&cc.name, cc.grace).as_bytes()).await;
    let _ = out.flush().await;
    let (reply, rx) = oneshot::channel();
    let outcome = match cc.terminate.send(reply).await {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the supervisor is exiting".into())),
        Err(_) => Err("the supervisor is exiting".into()),
    };
    let last = match outcome {
        Ok(how) => format!("{}\n", protocol::Verdict::ended(&how)),
        Err(why) => format!("{}\n", protocol::Verdict::failed(&why)),
    };
    let _ = out.write_all(last.as_bytes()).await;
    let _ = out.shutdown().await;
}

/// One request: the announcement at once, then the outcome, which is returned.
async fn serve<W: tokio::io::AsyncWrite + Unpin>(
    mut out: W,
    kind: DumpKind,
    dry: bool,
    ask: Ask,
    tx: mpsc::Sender<Request>,
    name: String,
) -> Outcome {
    let first = match kind {
        _ if dry => protocol::announce_doctor(&name),
        DumpKind::Stop => protocol::announce_stop(&name),
        DumpKind::KeepRunning | DumpKind::Periodic => protocol::announce_checkpoint(&name),
    };
    let _ = out.write_all(first.as_bytes()).await;
    let _ = out.flush().await;
    let (reply, mut rx) = oneshot::channel();
    let (lines, mut lines_rx) = mpsc::unbounded_channel();
    let outcome = match tx.send(Request { kind, dry, reply, lines, ask }).await {
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
    outcome
}
