//! The supervisor's event loop: turns connections, signals, dump completions and the service's
//! exit into [`Event`]s, runs them through the state machine and carries out its actions (a
//! dump is the engine's, on a blocking thread); each request is answered from its typed
//! outcome (outcome.rs), and what happened is reported through report.rs.

use super::kill_port::{self, admit, Ask, KillPortPolicy, StopGate};
use super::log_pump::LogWriter;
use super::outcome::{NotTaken, Outcome, TerminateRefused, WaitEnded};
use super::protocol;
use super::report::RunReport;
use super::state::{next, Action, Event, State};
use crate::engine::dump::{take_checkpoint, DumpProgress, StopGate as _};
use crate::engine::Job;
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
type TerminateReply = oneshot::Sender<Result<String, TerminateRefused>>;

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
    pub fn open(ctx: &Job, listeners: Listeners, log: &LogWriter) -> std::io::Result<Channels> {
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
    pub async fn wait_to_restart(&mut self, name: &str, delay: Duration) -> Result<(), WaitEnded> {
        let until = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(()),
                Some(req) = self.req_rx.recv() => {
                    let why = NotTaken::WaitingToRestart { service: name.to_string() };
                    let _ = req.reply.send(Err(why.clone()));
                    if req.kind == DumpKind::Stop {
                        return Err(WaitEnded::Stopped { why });
                    }
                }
                Some(reply) = self.term_rx.recv() => {
                    let _ = reply.send(Ok(format!("{name} was waiting to be restarted; it will not be")));
                    return Err(WaitEnded::Terminated);
                }
                _ = self.sigterm.recv() => return Err(WaitEnded::Sigterm),
                _ = self.sigint.recv() => return Err(WaitEnded::Sigint),
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
    ctx: Arc<Job>,
    init_pid: Pid,
    ch: &mut Channels,
    report: RunReport<'_>,
    pump: tokio::task::JoinHandle<()>,
) -> std::io::Result<LoopEnd> {
    let mut run = Run::new(ctx, init_pid, report);
    loop {
        let (event, request) = run.next_event(ch).await;
        if run.apply(event, request) {
            break;
        }
    }
    Ok(run.finish(&mut ch.sigchld, pump).await)
}

type Timer = std::pin::Pin<Box<tokio::time::Sleep>>;

/// The loop's state between events: the state machine's, plus what carries out its actions.
struct Run<'a> {
    ctx: Arc<Job>,
    init_pid: Pid,
    report: RunReport<'a>,
    dump_tx: mpsc::Sender<Outcome>,
    dump_rx: mpsc::Receiver<Outcome>,
    progress_tx: mpsc::UnboundedSender<DumpProgress>,
    progress_rx: mpsc::UnboundedReceiver<DumpProgress>,
    /// The service's exit, as an event: see [`Run::new`].
    exited: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    /// `checkpoint_every`: one timer, armed while the service runs; none without the setting.
    periodic: Option<Timer>,
    grace: Option<Timer>,
    state: State,
    exit_message: Option<String>,
    exit: Option<super::restart::Exit>,
    waiters: Vec<Waiter>,
    /// Stops that came during a dump that leaves the service running: they get the stop after it.
    queued: Vec<Waiter>,
    queued_asks: Vec<Ask>,
    /// Who asked for the stopping dump under way, asked again at its post-dump.
    gate: Option<Arc<StopGate>>,
    last_outcome: Option<Outcome>,
    terminators: Vec<TerminateReply>,
    /// Set once SIGTERM went to the service: its exit is then the stop, not a failure.
    terminated: bool,
}

impl<'a> Run<'a> {
    fn new(ctx: Arc<Job>, init_pid: Pid, report: RunReport<'a>) -> Run<'a> {
        let (dump_tx, dump_rx) = mpsc::channel::<Outcome>(1);
        let (progress_tx, progress_rx) = mpsc::unbounded_channel::<DumpProgress>();
        // A pidfd of the service's init becomes readable when it exits. SIGCHLD alone can race
        // with a restored root becoming our child; neither needs a timer, so an idle supervisor
        // never wakes up.
        let exited = crate::process::tree::pidfd(init_pid.as_raw())
            // SAFETY: the AsyncFd owns the pidfd, which nothing else uses or closes.
            .and_then(|fd| {
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
            });
        let periodic = ctx.service.checkpoint_every.map(|d| Box::pin(tokio::time::sleep(d)));
        warm_criu(&ctx);
        settle();
        Run {
            ctx,
            init_pid,
            report,
            dump_tx,
            dump_rx,
            progress_tx,
            progress_rx,
            exited,
            periodic,
            grace: None,
            state: State::Running,
            exit_message: None,
            exit: None,
            waiters: Vec::new(),
            queued: Vec::new(),
            queued_asks: Vec::new(),
            gate: None,
            last_outcome: None,
            terminators: Vec::new(),
            terminated: false,
        }
    }

    /// Waits for the next event for the state machine, with the request that brought it.
    async fn next_event(&mut self, ch: &mut Channels) -> (Event, Option<Request>) {
        loop {
            let (periodic, grace, exited) = (&mut self.periodic, &mut self.grace, &self.exited);
            let waiting_for_exit = exited.is_some() && self.exit_message.is_none();
            let running = periodic.is_some() && self.state == State::Running;
            let event = tokio::select! {
                Some(req) = ch.req_rx.recv() => {
                    let event = if req.dry { Event::DoctorRequested } else { Event::DumpRequested(req.kind) };
                    return (event, Some(req));
                }
                Some(reply) = ch.term_rx.recv() => {
                    self.report.terminate_requested();
                    self.terminators.push(reply);
                    Some(Event::Terminate)
                }
                Some(p) = self.progress_rx.recv() => {
                    self.dump_progress(p);
                    None
                }
                Some(outcome) = self.dump_rx.recv() => {
                    let ok = outcome.is_ok();
                    self.last_outcome = Some(outcome);
                    Some(if ok { Event::DumpSucceeded } else { Event::DumpFailed })
                }
                _ = ch.sigchld.recv() => self.reap(),
                _ = exit_of(exited), if waiting_for_exit => self.reap(),
                _ = async { periodic.as_mut().expect("guarded").await }, if running => self.periodic_due(),
                _ = ch.sigterm.recv() => Some(Event::Terminate),
                _ = ch.sigint.recv() => Some(Event::Terminate),
                _ = async { grace.as_mut().expect("guarded").await }, if grace.is_some() => {
                    self.grace = None;
                    Some(Event::GraceExpired)
                }
            };
            if let Some(event) = event {
                return (event, None);
            }
        }
    }

    fn dump_progress(&self, p: DumpProgress) {
        let line = match p {
            DumpProgress::Queued(line) => {
                self.report.queued(&line);
                line
            }
            DumpProgress::Dumping => return self.report.dumping(),
            DumpProgress::Progress(line) => {
                self.report.progress(&line);
                line
            }
        };
        for w in &self.waiters {
            let _ = w.lines.send(line.clone());
        }
    }

    fn reap(&mut self) -> Option<Event> {
        reap(self.init_pid, &mut self.exit_message, &mut self.exit)
    }

    fn periodic_due(&mut self) -> Option<Event> {
        self.periodic = None;
        match crate::engine::dump::room_for_periodic(&self.ctx, self.init_pid.as_raw()) {
            Ok(()) => Some(Event::PeriodicDue),
            Err(why) => {
                self.report.periodic_skipped(&why.to_string());
                self.arm_periodic();
                None
            }
        }
    }

    fn arm_periodic(&mut self) {
        self.periodic = self.ctx.service.checkpoint_every.map(|d| Box::pin(tokio::time::sleep(d)));
    }

    /// Runs `event` through the state machine and carries out its actions; true once the loop
    /// is to finish.
    fn apply(&mut self, event: Event, mut request: Option<Request>) -> bool {
        let (new_state, actions) = next(self.state, event);
        let mut finish = false;
        for action in actions {
            match action {
                Action::StartDump(kind) => self.start_dump(kind, request.take()),
                Action::StartDryRun => self.start_dry_run(request.take()),
                Action::QueueRequest => self.queue(request.take()),
                Action::JoinDump => self.join(request.take()),
                Action::RejectRequest => self.reject(request.take()),
                Action::ReplyToDumpWaiters => self.reply_to_waiters(new_state),
                Action::TerminateService => self.terminate_service(),
                Action::KillService => {
                    self.report.killing();
                    let _ = kill(self.init_pid, Signal::SIGKILL);
                }
                Action::Finish => finish = true,
            }
        }
        if new_state != self.state {
            let msg = self.change_message(new_state);
            self.report.state_changed(new_state, msg.as_deref());
        }
        self.state = new_state;
        finish
    }

    fn start_dump(&mut self, kind: DumpKind, request: Option<Request>) {
        tracing::debug!("loop: dump requested");
        let mut asks = std::mem::take(&mut self.queued_asks);
        if let Some(req) = request {
            asks.push(req.ask);
            self.waiters.push(Waiter { reply: req.reply, lines: req.lines });
        }
        self.waiters.append(&mut self.queued);
        self.gate = (kind == DumpKind::Stop).then(|| Arc::new(StopGate::new(asks)));
        self.report.dump_started(kind);
        self.spawn_dump(kind, false, self.gate.clone());
    }

    fn start_dry_run(&mut self, request: Option<Request>) {
        if let Some(req) = request {
            self.waiters.push(Waiter { reply: req.reply, lines: req.lines });
        }
        self.report.dry_run_started();
        self.spawn_dump(DumpKind::KeepRunning, true, None);
    }

    /// Takes the checkpoint on a blocking thread; its progress and outcome come back as events.
    fn spawn_dump(&self, kind: DumpKind, dry: bool, gate: Option<Arc<StopGate>>) {
        let (ctx, tx, progress, pid) =
            (self.ctx.clone(), self.dump_tx.clone(), self.progress_tx.clone(), self.init_pid);
        // Extending systemd's timeout covers the wait for a slot too.
        let keep_systemd_waiting = self.report.busy();
        tokio::task::spawn_blocking(move || {
            let report = |p: DumpProgress| {
                let _ = progress.send(p);
            };
            let asked = gate.as_deref().map(|g| g as &dyn crate::engine::dump::StopGate);
            let outcome = take_checkpoint(&ctx, pid.as_raw(), kind, dry, asked, report).map_err(NotTaken::from);
            drop(keep_systemd_waiting);
            // The clients' second descriptors close before they hear the outcome.
            drop(gate);
            let _ = tx.blocking_send(outcome);
        });
    }

    fn queue(&mut self, request: Option<Request>) {
        if let Some(req) = request {
            let _ = req.lines.send(format!(
                "Waiting: a checkpoint of {} that keeps it running is under way; the stop follows it",
                self.ctx.service.name
            ));
            self.queued_asks.push(req.ask);
            self.queued.push(Waiter { reply: req.reply, lines: req.lines });
        }
    }

    fn join(&mut self, request: Option<Request>) {
        if let Some(req) = request {
            let _ = req.lines.send(protocol::joined(&self.ctx.service.name));
            if let Some(g) = &self.gate {
                g.add(req.ask);
            }
            self.waiters.push(Waiter { reply: req.reply, lines: req.lines });
        }
    }

    fn reject(&self, request: Option<Request>) {
        if let Some(req) = request {
            let name = &self.ctx.service.name;
            let service = name.clone();
            let why = match self.state {
                State::Checkpointing { .. } => NotTaken::InProgress { service },
                _ => NotTaken::ShuttingDown { service },
            };
            let _ = req.reply.send(Err(why));
        }
    }

    fn reply_to_waiters(&mut self, new_state: State) {
        tracing::debug!("loop: dump finished");
        let outcome = self.last_outcome.clone().unwrap_or(Err(NotTaken::NoOutcome));
        let called_off = self.gate.take().and_then(|g| g.called_off()).is_some();
        self.report.dump_finished(&outcome, called_off);
        if new_state == State::Running {
            self.arm_periodic();
            warm_criu(&self.ctx);
            settle();
        }
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(outcome.clone());
        }
        // A stopping supervisor purges once it has let go of its lock.
        if new_state == State::Running {
            let purge = self.ctx.clone();
            std::thread::spawn(move || purge.store.purge_removed());
        }
        tracing::debug!("loop: replied");
    }

    fn terminate_service(&mut self) {
        self.report.terminating();
        let _ = kill(self.init_pid, Signal::SIGTERM);
        self.terminated = true;
        self.grace = Some(Box::pin(tokio::time::sleep(self.ctx.service.stop_timeout)));
    }

    /// What the status record says on entering `new_state`.
    fn change_message(&self, new_state: State) -> Option<String> {
        match new_state {
            State::Stopped if matches!(self.state, State::Checkpointing { .. }) => self
                .last_outcome
                .as_ref()
                .and_then(|o| o.as_ref().ok())
                .map(|r| format!("stopped after checkpoint {}", r.id)),
            State::Stopped if self.terminated => self.exit_message.as_ref().map(|m| without_checkpoint(m)),
            State::Failed | State::Stopped => self.exit_message.clone(),
            _ => None,
        }
    }

    /// The service may still be on its way out (CRIU kills it after the hook) and its last
    /// output in the pipe: waits for both, so nothing is lost and no zombie stays; then answers
    /// whoever still waits.
    async fn finish(mut self, sigchld: &mut tokio::signal::unix::Signal, pump: tokio::task::JoinHandle<()>) -> LoopEnd {
        // The run is over: a criu kept warm for its next dump has nothing left to dump.
        crate::criu::standby::discard();
        let deadline = tokio::time::Instant::now() + FINISH_TIMEOUT;
        while self.reap().is_none() && self.exit_message.is_none() {
            tokio::select! {
                _ = exit_of(&self.exited), if self.exited.is_some() => {}
                _ = sigchld.recv() => {}
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if self.exit_message.is_none() {
            let _ = kill(self.init_pid, Signal::SIGKILL);
            let _ = waitpid(self.init_pid, None);
        }
        if tokio::time::timeout(FINISH_TIMEOUT, pump).await.is_err() {
            self.report.output_cut_short();
        }
        let message = self.end_message();
        let name = &self.ctx.service.name;
        for w in self.queued {
            let _ = w.reply.send(Err(NotTaken::ExitedBeforeStop { service: name.clone() }));
        }
        for t in self.terminators {
            let answer = match self.state {
                State::Stopped => Ok(message.clone()),
                _ => Err(TerminateRefused::ExitedFirst { service: name.clone(), how: message.clone() }),
            };
            let _ = t.send(answer);
        }
        tracing::debug!("loop: service gone");
        LoopEnd { state: self.state, exit: self.exit, last_outcome: self.last_outcome, message }
    }

    fn end_message(&self) -> String {
        let exit_message = self.exit_message.clone();
        match self.state {
            State::Stopped => self
                .last_outcome
                .clone()
                .and_then(|o| o.ok())
                .map(|r| format!("stopped after checkpoint {}", r.id))
                .or_else(|| exit_message.as_ref().filter(|_| self.terminated).map(|m| without_checkpoint(m)))
                .or(exit_message)
                .unwrap_or_else(|| "stopped".into()),
            _ => exit_message.unwrap_or_else(|| "exited".into()),
        }
    }
}

/// Ready once the service's init has exited (its pidfd is readable).
async fn exit_of(exited: &Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>) {
    let _ = exited.as_ref().expect("guarded").readable().await.map(|mut g| g.clear_ready());
}

/// The service runs and the supervisor will wait: it lets go of the code pages the start or
/// the dump touched (supervisor::idle).
fn settle() {
    let shed = super::idle::shed_clean_mappings();
    tracing::debug!("loop: idle, {} KiB of clean mappings shed", shed >> 10);
}

/// Has a CRIU warm up for the service's next dump, where the host wants one (criu::standby).
fn warm_criu(ctx: &Job) {
    use crate::criu::standby::{self, Purpose};
    // As many warm criu processes on the host as dumps may run at once: a host of many services
    // must not keep an idle criu for each (the others start theirs when they dump).
    if standby::wanted(ctx.host.warm_criu) && !standby::parked(&ctx.criu.path, Purpose::Dump) {
        if let Some(slot) =
            crate::engine::slots::try_acquire(&ctx.dirs.slots(), "warm-criu", ctx.host.max_concurrent_dumps)
        {
            standby::prepare(&ctx.criu.path, Purpose::Dump, Box::new(slot));
        }
    }
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
        Ok(()) => rx.await.unwrap_or(Err(TerminateRefused::SupervisorExiting)),
        Err(_) => Err(TerminateRefused::SupervisorExiting),
    };
    let last = match outcome {
        Ok(how) => format!("{}\n", protocol::Verdict::ended(&how)),
        Err(why) => format!("{}\n", protocol::Verdict::failed(&why.to_string())),
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
                    break outcome.unwrap_or(Err(NotTaken::SupervisorExiting));
                }
            }
        },
        Err(_) => Err(NotTaken::SupervisorExiting),
    };
    let _ = out.write_all(protocol::final_line(&outcome).as_bytes()).await;
    let _ = out.shutdown().await;
    outcome
}
