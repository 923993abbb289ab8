//! The supervisor's life: lock, listen, start the service (the engine's restore-or-cold start),
//! wait for its readiness, run the event loop, restart it as `restart:` says; what each step
//! comes to is reported through report.rs.

use super::event_loop::{run_loop, Channels, Listeners, LoopEnd};
use super::lock::{self, Acquired};
use super::log_pump::{spawn_pump, LogWriter};
use super::outcome::NotTaken;
use super::probation::survives_probation;
use super::ready::Notifier;
use super::report::Reporter;
use super::restart::{Decision, Exit, Restarts};
use super::state::State;
use super::status::{StartedFrom, StatusRecord};
use super::{Ended, StartError as Error, SupervisorError};
use crate::config::Service;
use crate::criu::Criu;
use crate::engine::restore::{start_service, Pick, StartProgress, Started};
use crate::engine::Job;
use crate::paths::Dirs;
use crate::process::init_binary;
use crate::store::durable::create_dir_with_mode;
use crate::store::identity::HashCache;
use crate::store::CheckpointStore;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

/// The namespace init of a previous run whose supervisor died, if it still runs. It is
/// recognised by its working directory, which is always this service's state directory.
fn orphaned_tree(paths: &crate::paths::ServicePaths) -> Option<i32> {
    let pid = StatusRecord::read(paths).filter(|r| r.state.is_up())?.init_pid?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_init = cmdline.split(|b| *b == 0).nth(1) == Some(crate::process::ns_init::ARGV_MARKER.as_bytes());
    (is_init && cwd == paths.root).then_some(pid)
}

/// Whether the service has a checkpoint a start may restore (any, however it will be judged).
fn has_checkpoints(paths: &crate::paths::ServicePaths) -> bool {
    std::fs::read_dir(paths.checkpoints())
        .map(|rd| rd.flatten().any(|e| !e.file_name().to_string_lossy().starts_with('.')))
        .unwrap_or(false)
}

/// Runs the supervisor in this process until the service is stopped or gone. A start that
/// failed is the caller's to report, on `notifier` too (the report was not sent).
/// In the foreground (systemd), the supervisor's notes also go to stderr, i.e. the journal.
/// `from` restores that checkpoint or nothing; `cold` (`restart --cold`) restores none.
pub fn run(
    dirs: Dirs,
    service: Service,
    from: Option<String>,
    cold: bool,
    notifier: &mut Notifier,
    foreground: bool,
) -> Result<Ended, Error> {
    // Whatever the caller's umask (`umask 000` in a shell), what the supervisor, CRIU and the
    // hooks create (logs, locks, images) is root's alone; the service gets its own umask at launch.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let pick = match (&from, cold) {
        (Some(id), _) => Pick::Id(id),
        (None, true) => Pick::Cold,
        (None, false) => Pick::Newest,
    };
    let opened = open(dirs, service, foreground, !matches!(pick, Pick::Cold))?;
    supervise(opened, pick, notifier)
}

/// What the supervisor holds for the service's whole life.
struct Opened {
    ctx: Arc<Job>,
    kill_port: std::net::TcpListener,
    control: std::os::unix::net::UnixListener,
    log: LogWriter,
    lock: lock::ServiceLock,
}

/// Everything before the service starts: the service's lock, its kill port and control socket,
/// the subreaper, the log, and the namespace init's copy (verified before every use: a damaged
/// copy is re-created here, never blamed on a checkpoint).
fn open(dirs: Dirs, service: Service, foreground: bool, restoring: bool) -> Result<Opened, Error> {
    tracing::debug!("supervisor: begin");
    let criu = Criu::get_cached(&dirs.criu_version_cache())?;
    tracing::debug!("supervisor: criu found");
    let host = crate::config::host::HostConfig::load(&dirs.host_config)?;
    // Don't keep the caller's working directory busy for the service's lifetime.
    let _ = std::env::set_current_dir("/");
    let paths = dirs.service(&service.name);
    let lock = match lock::acquire(&paths.lock)
        .map_err(|source| SupervisorError::Lock { path: paths.lock.clone(), source })?
    {
        Acquired::Yes(l) => l,
        Acquired::HeldBy(pid) => return Err(Error::AlreadyRunning { service: service.name.clone(), pid }),
    };
    create_dir_with_mode(&paths.root, 0o700)?;
    if let Some(pid) = orphaned_tree(&paths) {
        return Err(Error::Orphaned { service: service.name.clone(), pid });
    }
    if restoring && crate::criu::standby::wanted(host.warm_criu) && has_checkpoints(&paths) {
        // The restore's criu probes the kernel while the rest is set up (criu::standby).
        crate::criu::standby::prepare(&criu.path, crate::criu::standby::Purpose::Restore, Box::new(()));
    }
    let kill_port = std::net::TcpListener::bind(("127.0.0.1", service.kill_port)).map_err(|source| {
        // Named, so the operator sees who took it (any user may bind a stopped service's port).
        let holder =
            (source.kind() == std::io::ErrorKind::AddrInUse).then(|| super::holder::find(service.kill_port)).flatten();
        SupervisorError::KillPortInUse { port: service.kill_port, file: service.file.clone(), source, holder }
    })?;
    let _ = std::fs::remove_file(&paths.control_socket);
    let control = std::os::unix::net::UnixListener::bind(&paths.control_socket)
        .map_err(|source| SupervisorError::ControlSocket { path: paths.control_socket.clone(), source })?;
    let _ = std::fs::set_permissions(&paths.control_socket, std::fs::Permissions::from_mode(0o600));
    nix::sys::prctl::set_child_subreaper(true).map_err(SupervisorError::Subreaper)?;
    let log = LogWriter::open(&paths.service_log(), foreground, service.log_max_bytes, service.log_keep)
        .map_err(|e| Error::io("open", paths.service_log(), e))?;
    tracing::debug!("supervisor: listening");
    let mut cache = HashCache::load(dirs.hash_cache());
    let installed = init_binary::install(&dirs.init_binaries(), &mut cache)?;
    cache.save();
    if let init_binary::Installed::Repaired(_, why) = &installed {
        log.note(&format!("{why}; re-created it from the init program"));
    }
    let init_binary = installed.path().to_path_buf();
    let store = CheckpointStore::new(&paths);
    let kernel_version = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    let ctx = Arc::new(Job {
        dirs,
        host,
        service,
        paths,
        store,
        criu,
        init_binary,
        kernel_version,
        dirty: Default::default(),
        tracked: Default::default(),
    });
    // Asked now, never during a stop (which starts no program but criu): remembered per CRIU
    // binary and boot, so only the first start after a boot pays for a `criu check`.
    let _ = ctx.dirty_tracking();
    tracing::debug!("supervisor: init installed");
    Ok(Opened { ctx, kill_port, control, log, lock })
}

fn supervise(opened: Opened, pick: Pick, notifier: &mut Notifier) -> Result<Ended, Error> {
    let Opened { ctx, kill_port, control, log, lock } = opened;
    let report = Reporter::new(ctx.clone(), log.clone());
    let waiting: &Notifier = notifier;
    let progress = |p: StartProgress| report.start_progress(p, Some(waiting));
    let started = start(&ctx, &report, pick, &progress).and_then(|s| {
        // With `ready:` the readiness wait notices a command that dies at once.
        if s.info.started_from == StartedFrom::Cold && ctx.service.ready.is_none() {
            survives_probation(&s, &ctx.service.name, &log)?;
        }
        Ok(s)
    });
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            report.start_failed(&format!("failed to start: {e}"));
            return Err(match e {
                Error::Engine(_) | Error::StartFailed(_) => e,
                other => Error::StartFailed(other.to_string()),
            });
        }
    };
    tracing::debug!("supervisor: service started");
    note_periodic(&ctx, &log);
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(SupervisorError::Runtime)?;
    let end = runtime.block_on(serve_runs(&ctx, kill_port, control, &log, &report, notifier, started))?;
    let _ = std::fs::remove_file(&ctx.paths.control_socket);
    report.ended();
    // `stop` returns once the lock is free; the kill port and control socket close with the
    // runtime first, so a supervisor started right away can bind them. Deleting the files of
    // checkpoints retention took away is nobody's wait.
    drop(runtime);
    drop(lock);
    ctx.store.purge_removed();
    Ok(match end.state {
        State::Stopped => Ended::Stopped,
        _ => Ended::Failed,
    })
}

/// The engine's start, with systemd's timeout extended while it runs.
fn start(
    ctx: &Job,
    report: &Reporter,
    pick: Pick,
    progress: &(dyn Fn(StartProgress) + Sync),
) -> Result<Started, Error> {
    let _keep_systemd_waiting = report.busy();
    Ok(start_service(ctx, pick, progress)?)
}

/// Says in the log what periodic checkpoints will be.
fn note_periodic(ctx: &Job, log: &LogWriter) {
    if let Some(every) = ctx.service.checkpoint_every {
        let every = crate::time_fmt::human_duration(every);
        if crate::engine::dump::incremental::tracking_possible(ctx) {
            log.note(&format!(
                "periodic checkpoints every {every}: incremental (only the pages written since the previous one), a full one after every {} incremental ones (full_every)",
                ctx.service.full_every
            ));
            return;
        }
        let why = if !ctx.dirty_tracking() {
            "incremental dumps need the kernel's soft-dirty page tracking (CONFIG_MEM_SOFT_DIRTY), which this kernel lacks"
        } else {
            "incremental checkpoints are never encrypted, and this service's are (encryption_key_file)"
        };
        log.note(&format!(
            "periodic checkpoints every {every}: each one a full dump ({why}; full_every: {} is not used)",
            ctx.service.full_every
        ));
    }
}

/// The runs of the service, from the first start through every restart `restart:` allows,
/// until it is stopped or gone for good.
async fn serve_runs(
    ctx: &Arc<Job>,
    kill_port: std::net::TcpListener,
    control: std::os::unix::net::UnixListener,
    log: &LogWriter,
    report: &Reporter,
    notifier: &mut Notifier,
    first_start: Started,
) -> Result<LoopEnd, Error> {
    let kill_port = {
        kill_port.set_nonblocking(true).map_err(|e| Error::io("configure", "the kill port", e))?;
        tokio::net::TcpListener::from_std(kill_port).map_err(|e| Error::io("configure", "the kill port", e))?
    };
    let control = {
        control.set_nonblocking(true).map_err(|e| Error::io("configure", ctx.paths.control_socket.clone(), e))?;
        tokio::net::UnixListener::from_std(control)
            .map_err(|e| Error::io("configure", ctx.paths.control_socket.clone(), e))?
    };
    let mut ch = Channels::open(ctx, Listeners { kill_port, control }, log).map_err(SupervisorError::Runtime)?;
    let mut restarts = Restarts::new(&ctx.service);
    let mut current = first_start;
    let mut first = true;
    let end = loop {
        let began = std::time::Instant::now();
        // Only a restart can prove a checkpoint bad: the run `start` began may have gone on
        // for days (and taken newer checkpoints) before it exited.
        let restored_generation =
            current.info.checkpoint.as_deref().and_then(crate::store::generation_of_id).filter(|_| !first);
        let end = one_run(ctx, &mut ch, log, report, notifier, current, first).await?;
        first = false;
        if let Some(f) = crate::engine::restore::lazy_start::take_failure() {
            // A lazy restore that failed after it resumed: cold, whatever `restart:` says.
            log.note(&f.reason);
            let c = ctx.clone();
            match tokio::task::spawn_blocking(move || crate::engine::restore::lazy_start::cold_after(&c, &f)).await {
                Ok(Ok(s)) => {
                    current = s;
                    continue;
                }
                Ok(Err(e)) => log.note(&format!("failed to cold-start after the lazy restore failed: {e}")),
                Err(e) => log.note(&format!("failed to cold-start after the lazy restore failed: {e}")),
            }
        }
        if end.state != State::Failed {
            break end;
        }
        match after_exit(ctx, &mut ch, report, &mut restarts, end, began, restored_generation).await {
            Next::Run(s) => current = s,
            Next::End(end) => break end,
        }
    };
    // Requests that came in while it finished still get an answer: the checkpoint they
    // asked for if it was taken, else why not.
    let late = match (&end.state, &end.last_outcome) {
        (State::Stopped, Some(Ok(r))) => Ok(r.clone()),
        _ => Err(NotTaken::NotRunning { service: ctx.service.name.clone() }),
    };
    ch.close(&ctx.service.name, late).await;
    tracing::debug!("loop: exiting");
    report.exiting(&end.message);
    Ok(end)
}

/// One run of the service: its readiness (`ready:`), the report of its start, then the event
/// loop until it ends. A first run that never became ready is the start's failure.
async fn one_run(
    ctx: &Arc<Job>,
    ch: &mut Channels,
    log: &LogWriter,
    report: &Reporter,
    notifier: &mut Notifier,
    current: Started,
    first: bool,
) -> Result<LoopEnd, Error> {
    let Started { info: started, output, notify } = current;
    let init_pid = started.init_pid;
    let pump = spawn_pump(output, log.clone());
    // `ready:`: the start counts only once the service answers (its output is pumped
    // meanwhile, so it never blocks on a full pipe).
    if let Some(ready) = ctx.service.ready.clone() {
        let probe_ctx = ctx.clone();
        let waits = notifier.for_progress();
        let outcome = tokio::task::spawn_blocking(move || {
            super::readiness::wait(&probe_ctx, init_pid, &ready, notify.as_ref(), &|l| waits.progress(&l))
        })
        .await
        .unwrap_or_else(|e| Err(super::readiness::NotReady::Panicked(e)));
        if let Err(why) = outcome {
            let _ = nix::sys::signal::kill(init_pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(init_pid, None);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), pump).await;
            let tail = super::readiness::last_lines(&ctx.paths.service_log(), 10);
            let msg = format!("failed to start {}: {why}; stopped it{tail}", ctx.service.name);
            report.start_failed(&msg);
            if first {
                return Err(Error::StartFailed(msg));
            }
            return Ok(LoopEnd { state: State::Failed, message: msg, exit: None, last_outcome: None });
        }
    }
    // With `ready:`, the readiness probe has just answered for the first time.
    let first_answer_ms = ctx.service.ready.is_some().then(|| started.began.elapsed().as_millis() as u64);
    report.started(notifier, &started, first, first_answer_ms)?;
    follow_transfer(report, &started);
    let purge = ctx.clone();
    // A thread that ends with the work (a blocking-pool thread would linger and wake up later
    // to exit: an idle supervisor does not wake up).
    std::thread::spawn(move || purge.store.purge_removed());
    Ok(run_loop(ctx.clone(), init_pid, ch, report.run(&started), pump).await.map_err(SupervisorError::Runtime)?)
}

/// While a lazy restore brings pages in, its progress goes to the status record and the
/// metrics twice a second, and once more when it ends (a thread that ends with the transfer).
fn follow_transfer(report: &Reporter, started: &crate::engine::restore::StartInfo) {
    use crate::engine::restore::lazy_start::{transfer, transfer_after, TransferState};
    let ours =
        |t: &crate::engine::restore::lazy_start::TransferStatus| started.checkpoint.as_ref() == Some(&t.checkpoint);
    if !transfer().is_some_and(|t| ours(&t) && t.state == TransferState::Transferring) {
        return;
    }
    let report = report.clone();
    let checkpoint = started.checkpoint.clone();
    let _ = std::thread::Builder::new().name("stasis-lazy-report".into()).spawn(move || loop {
        let Some(t) = transfer_after(std::time::Duration::from_millis(500)) else { break };
        if checkpoint.as_ref() != Some(&t.checkpoint) {
            break;
        }
        let done = t.state != TransferState::Transferring;
        report.transfer(t);
        if done {
            break;
        }
    });
}

/// After a run that failed: another run, or the end.
enum Next {
    Run(Started),
    End(LoopEnd),
}

/// The service exited by itself: `restart:` says whether it comes back, after how long, from
/// what; a restart that fails to start is judged as an exit of its own.
#[allow(clippy::too_many_arguments)]
async fn after_exit(
    ctx: &Arc<Job>,
    ch: &mut Channels,
    report: &Reporter,
    restarts: &mut Restarts,
    end: LoopEnd,
    began: std::time::Instant,
    restored_generation: Option<u64>,
) -> Next {
    let (mut exit, mut began, mut restored_generation) = (end.exit, began, restored_generation);
    loop {
        let now = std::time::Instant::now();
        let decision = restarts.after_exit(exit.unwrap_or(Exit::Unknown), began, now, restored_generation);
        let (after, pick, number) = match decision {
            Decision::Stay => return Next::End(end),
            Decision::GiveUp(why) => {
                let msg = format!("{}; {why}", end.message);
                report.gave_up(&msg);
                return Next::End(LoopEnd { message: msg, ..end });
            }
            Decision::Restart { after, below_generation, cold, number } => {
                let pick = if cold { Pick::Cold } else { Pick::AfterExit { below_generation } };
                (after, pick, number)
            }
        };
        let msg = format!(
            "{}; restarting it in {} (restart {number}; restart_limit: {} in {})",
            end.message,
            crate::time_fmt::human_duration(after),
            ctx.service.restart_limit.count,
            crate::time_fmt::human_duration(ctx.service.restart_limit.within)
        );
        report.restarting(msg);
        if let Err(why) = ch.wait_to_restart(&ctx.service.name, after).await {
            let why = why.to_string();
            report.stopped_waiting(&why);
            return Next::End(LoopEnd { state: State::Stopped, message: why, exit: None, last_outcome: None });
        }
        report.restart_begins();
        let (c, r) = (ctx.clone(), report.clone());
        let restarted = tokio::task::spawn_blocking(move || {
            let s = start(&c, &r, pick, &|p| r.start_progress(p, None))?;
            if s.info.started_from == StartedFrom::Cold && c.service.ready.is_none() {
                survives_probation(&s, &c.service.name, r.log())?;
            }
            Ok::<_, Error>(s)
        })
        .await
        .unwrap_or_else(|e| Err(Error::StartFailed(format!("the restart panicked: {e}"))));
        match restarted {
            Ok(s) => return Next::Run(s),
            Err(e) => {
                report.restart_failed(&e);
                (exit, began, restored_generation) = (None, std::time::Instant::now(), None);
            }
        }
    }
}
