//! `criu dump` and `criu restore`, each as one RPC conversation (criu::rpc): the options a
//! service may set reach CRIU as one config file (its `criu.config` then its `criu.options`, in
//! the command line's order of precedence), CRIU's log is copied into `dump.log` or
//! `restore.log` within caps, and the notifications are answered by the caller, in its own
//! process. At a dump's `post-dump` (the images written, the tree still frozen) a refusal makes
//! CRIU resume the tree instead of ending it. A restore is detached, as RPC restores always are:
//! CRIU exits after answering, and the restored root is re-parented to the supervisor (a child
//! subreaper). A restore's `post-restore` and `pre-resume` are the caller's gate: a refusal at
//! `post-restore` makes CRIU kill the tree (cr-restore.c: "Aborting restore due to post-restore
//! script"), but CRIU only logs one at `pre-resume` and resumes the tree anyway ("Pre-resume
//! script ret code"), so there the tree is killed here, before the answer.

use super::argv::{DumpArgs, RestoreArgs, DUMP_LOG, PRE_DUMP_LOG, RESTORE_LOG};
use super::log_errors::{error_lines, pick};
use super::page_server::{PageServerError, Received};
use super::rpc::{pb, Answer, Notification, RpcError, Swrk};
use super::{Criu, CriuError};
use crate::store::stored::Transform;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

const ACTION: &str = "dump the service";
const PRE_DUMP_ACTION: &str = "pre-dump the service";
/// Verbose logs cost little next to a dump and are what makes a failure diagnosable.
const LOG_LEVEL: i32 = 4;
/// The config file CRIU reads for a dump, beside its log.
pub const RPC_CONFIG: &str = "criu-dump.conf";
/// The config file CRIU reads for a restore, beside its log.
pub const RESTORE_CONFIG: &str = "criu-restore.conf";
const RESTORE: &str = "restore the checkpoint";

/// A restored tree: the host PID of its root (the namespace init).
#[derive(Debug)]
pub struct RestoreOutcome {
    pub pid: i32,
}

impl Criu {
    /// Dumps the tree of `args.pid` over RPC within `timeout`, its memory pages received in
    /// this process (criu::page_server) and stored through `t`; `at_post_dump` decides whether
    /// the dump stands (see the module doc), knowing what was received. `spawned` hears criu's
    /// pid (progress).
    pub fn dump(
        &self,
        args: &DumpArgs,
        t: &Transform<'_>,
        timeout: Duration,
        spawned: &dyn Fn(i32),
        at_post_dump: &mut dyn FnMut(&Received) -> Answer,
    ) -> Result<Received, CriuError> {
        self.exchange(pb::CriuReqType::Dump, args, t, timeout, spawned, at_post_dump)
    }

    /// `criu pre-dump` of the tree of `args.pid` within `timeout`: its pages copied to our page
    /// server while the tree is frozen only to collect them, its soft-dirty bits cleared, so a
    /// dump taken next with `parent_img` this pre-dump's images freezes the tree only for the
    /// pages written since. The tree runs on whatever happens.
    pub fn pre_dump(
        &self,
        args: &DumpArgs,
        t: &Transform<'_>,
        timeout: Duration,
        spawned: &dyn Fn(i32),
    ) -> Result<Received, CriuError> {
        // A pre-dump has no post-dump to answer; its own notifications need nothing of us.
        self.exchange(pb::CriuReqType::PreDump, args, t, timeout, spawned, &mut |_| Answer::Proceed)
    }

    fn exchange(
        &self,
        kind: pb::CriuReqType,
        args: &DumpArgs,
        t: &Transform<'_>,
        timeout: Duration,
        spawned: &dyn Fn(i32),
        at_post_dump: &mut dyn FnMut(&Received) -> Answer,
    ) -> Result<Received, CriuError> {
        let pre_dump = kind == pb::CriuReqType::PreDump;
        let deadline = Instant::now() + timeout;
        let log = args.work_dir.join(if pre_dump { PRE_DUMP_LOG } else { DUMP_LOG });
        let config = args.work_dir.join(RPC_CONFIG);
        write_config(&config, &args.config_file, &args.options)
            .map_err(|source| CriuError::Spawn { path: config.clone(), source })?;
        // CRIU opens the work dir through /proc/OUR_PID/fd/N: it must stay open meanwhile.
        let work = std::fs::File::open(&args.work_dir)
            .map_err(|source| CriuError::Spawn { path: args.work_dir.clone(), source })?;
        use super::standby::{Ends, Purpose, Warm};
        // The warm criu is kept for the dump that follows a pre-dump.
        let warm = if pre_dump { None } else { super::standby::take(&self.path, Purpose::Dump) };
        let (mut swrk, ours, pages_fd) = match warm {
            Some(Warm { swrk, ends: Ends::Dump { pages, pages_fd } }) => (swrk, pages, pages_fd),
            _ => self.cold_swrk(deadline)?,
        };
        swrk.renew(deadline);
        swrk.capture_log(&log);
        let mut req = dump_request(args, &work, &config, pages_fd);
        req.r#type = kind as i32;
        spawned(swrk.pid());
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (images, pages) = (args.images_dir.clone(), &args.pages);
            s.spawn(move || {
                let _ = tx.send(super::page_server::serve(ours, &images, pages, t, deadline));
            });
            let mut pages: Option<Result<Received, PageServerError>> = None;
            let take = |pages: &mut Option<_>| {
                if pages.is_none() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    *pages = Some(rx.recv_timeout(left).unwrap_or(Err(PageServerError::TimedOut)));
                }
            };
            let reply = swrk.call(&req, &mut |n| {
                if n.script != "post-dump" || pre_dump {
                    return Answer::Proceed;
                }
                // CRIU has said it sent every page (and heard they were stored) by now.
                take(&mut pages);
                match pages.as_ref().expect("taken") {
                    Ok(received) => at_post_dump(received),
                    Err(e) => Answer::Refuse(e.to_string()),
                }
            });
            let recent = swrk.take_log();
            let timed_out =
                || CriuError::TimedOut { action: ACTION, setting: "dump_timeout", after: timeout, log: log.clone() };
            let action = if pre_dump { PRE_DUMP_ACTION } else { ACTION };
            let failed = |status: String, first: Option<String>| failure(action, status, &recent, &log, first);
            let dumped = if pre_dump {
                pre_dump_answer(reply, swrk, timed_out, &failed)
            } else {
                dump_answer(reply, swrk, timed_out, &failed)
            };
            take(&mut pages);
            drop(work);
            with_pages(dumped, pages.expect("taken"), &failed)
        })
    }
}

impl Criu {
    /// A criu of the dump's own, started now (no warm one was ready: criu::standby).
    fn cold_swrk(&self, deadline: Instant) -> Result<(Swrk, UnixStream, RawFd), CriuError> {
        let spawn = |source| CriuError::Spawn { path: self.path.clone(), source };
        let (pages, theirs) = super::page_server::socket_pair().map_err(spawn)?;
        let swrk = Swrk::spawn(&self.path, &[theirs.as_fd()], true, deadline)
            .map_err(|e| spawn(std::io::Error::other(e.to_string())))?;
        // Only criu holds its end now: if it dies, the page server hears the end of the stream.
        Ok((swrk, pages, theirs.as_raw_fd()))
    }
}

/// The request: the images into `args.images_dir`, the pages to our page server through
/// criu's descriptor `pages_fd`.
fn dump_request(args: &DumpArgs, work: &std::fs::File, config: &Path, pages_fd: RawFd) -> pb::CriuReq {
    let opts = pb::CriuOpts {
        images_dir_fd: -1,
        images_dir: Some(args.images_dir.display().to_string()),
        work_dir_fd: Some(work.as_raw_fd()),
        pid: Some(args.pid),
        leave_running: Some(args.leave_running),
        track_mem: args.track_mem.then_some(true),
        parent_img: args.parent_img.clone(),
        notify_scripts: Some(true),
        log_to_stderr: Some(true),
        log_level: Some(LOG_LEVEL),
        config_file: Some(config.display().to_string()),
        ps: Some(pb::CriuPageServerInfo { fd: Some(pages_fd), ..Default::default() }),
        ..Default::default()
    };
    pb::CriuReq { r#type: pb::CriuReqType::Dump as i32, opts: Some(opts), ..Default::default() }
}

/// What CRIU's answer to a dump means; `swrk` is gone on return.
fn dump_answer(
    reply: Result<super::rpc::Reply, RpcError>,
    swrk: Swrk,
    timed_out: impl Fn() -> CriuError,
    failed: &dyn Fn(String, Option<String>) -> CriuError,
) -> Result<(), CriuError> {
    match reply {
        Ok(r) if r.resp.success => {
            tracing::debug!("dump: criu notified {:?}", r.notified);
            match swrk.finish() {
                Err(RpcError::TimedOut { .. }) => Err(timed_out()),
                _ => Ok(()),
            }
        }
        other => {
            // criu must be gone before the page server can hear the end of its stream.
            drop(swrk);
            match other {
                Ok(r) => Err(failed(answered_failure(&r), None)),
                Err(RpcError::TimedOut { .. }) => Err(timed_out()),
                Err(RpcError::Refused { script, refused }) => {
                    Err(failed(format!("refused at {script}"), Some(format!("stasis refused the dump: {refused}"))))
                }
                Err(e) => Err(failed(e.to_string(), None)),
            }
        }
    }
}

/// What CRIU's answer to a pre-dump means. A criu that served a pre-dump waits for the next
/// request of the same conversation (cr-service.c's pre-dump loop): it is ended here, once its
/// answer is in (the pre-dump's own process has exited by then).
fn pre_dump_answer(
    reply: Result<super::rpc::Reply, RpcError>,
    swrk: Swrk,
    timed_out: impl Fn() -> CriuError,
    failed: &dyn Fn(String, Option<String>) -> CriuError,
) -> Result<(), CriuError> {
    drop(swrk);
    match reply {
        Ok(r) if r.resp.success => Ok(()),
        Ok(r) => Err(failed(answered_failure(&r), None)),
        Err(RpcError::TimedOut { .. }) => Err(timed_out()),
        Err(e) => Err(failed(e.to_string(), None)),
    }
}

/// The dump's outcome from CRIU's and the page server's.
fn with_pages(
    dumped: Result<(), CriuError>,
    pages: Result<Received, PageServerError>,
    failed: &dyn Fn(String, Option<String>) -> CriuError,
) -> Result<Received, CriuError> {
    match (dumped, pages) {
        (Ok(()), Ok(received)) => Ok(received),
        (Ok(()), Err(e)) => Err(failed("its pages did not all arrive".into(), Some(e.to_string()))),
        // The page server's own word first: CRIU's is only that the socket broke.
        (Err(CriuError::Failed { action, status, log, errors }), Err(e)) if !matches!(e, PageServerError::Closed) => {
            let errors = std::iter::once(e.to_string()).chain(errors).collect();
            Err(CriuError::Failed { action, status, log, errors })
        }
        (Err(e), _) => Err(e),
    }
}

impl Criu {
    /// Restores detached within `timeout`; `stdout_pipe` (the write end of the service's new
    /// stdout pipe) is handed to criu under its own number for `inherit_fd`. `spawned` hears
    /// criu's PID (for progress). `gate` answers `post-restore` and `pre-resume` (see the
    /// module doc): the tree resumes only if it proceeds at both.
    pub fn restore(
        &self,
        args: &RestoreArgs,
        stdout_pipe: Option<BorrowedFd<'_>>,
        timeout: Duration,
        spawned: &dyn Fn(i32),
        gate: &mut dyn FnMut(&Notification) -> Answer,
        warm: Option<Swrk>,
    ) -> Result<RestoreOutcome, CriuError> {
        let deadline = Instant::now() + timeout;
        let log = args.work_dir.join(RESTORE_LOG);
        let config = args.work_dir.join(RESTORE_CONFIG);
        write_config_with(&config, &args.config_file, &args.options, args.streamed_from.is_some())
            .map_err(|source| CriuError::Spawn { path: config.clone(), source })?;
        let work = std::fs::File::open(&args.work_dir)
            .map_err(|source| CriuError::Spawn { path: args.work_dir.clone(), source })?;
        let req = restore_request(args, &work, &config, stdout_pipe);
        let inherit: Vec<BorrowedFd<'_>> = stdout_pipe.into_iter().collect();
        let mut swrk = match warm {
            // Started with the stdout pipe's write end under the number `stdout_pipe` has.
            Some(mut swrk) => {
                swrk.renew(deadline);
                swrk.capture_log(&log);
                swrk
            }
            None => Swrk::start(&self.path, &inherit, Some(&log), deadline).map_err(|e| CriuError::Spawn {
                path: self.path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?,
        };
        let criu = swrk.pid();
        spawned(criu);
        // The tree's root, from `post-restore`: what a refused `pre-resume` kills.
        let mut root: Option<i32> = None;
        let mut killed = false;
        let reply = swrk.call(&req, &mut |n| match n.script.as_str() {
            "post-restore" => {
                root = n.pid.or(root);
                gate(n)
            }
            "pre-resume" => {
                let answer = gate(n);
                if answer != Answer::Proceed {
                    // CRIU would resume the tree whatever the answer: no process of it may run.
                    if let Some(pid) = root {
                        kill_stopped_tree(pid, criu);
                        killed = true;
                    }
                }
                answer
            }
            _ => Answer::Proceed,
        });
        if killed || matches!(&reply, Err(RpcError::Refused { .. })) {
            // A tree CRIU left behind after a refusal (it answers once it has given up) is
            // re-parented to us once criu exits: it must not live on.
            if let Some(pid) = root {
                let _ = swrk_wait(&mut swrk);
                crate::process::tree::kill_if_child_of(pid, std::process::id() as i32, libc::SIGKILL);
            }
        }
        let timed_out = || {
            // The trees criu was creating are its children until it exits: each is the init of
            // its own PID namespace, so killing it ends the namespace. (criu itself is gone.)
            for pid in crate::process::tree::children_of(criu) {
                crate::process::tree::kill_if_child_of(pid, criu, libc::SIGKILL);
            }
            CriuError::TimedOut { action: RESTORE, setting: "restore_timeout", after: timeout, log: log.clone() }
        };
        let reply = match reply {
            Err(RpcError::TimedOut { .. }) => return Err(timed_out()),
            other => other,
        };
        let recent = swrk.take_log();
        let failed = |status: String| failure(RESTORE, status, &recent, &log, None);
        let r = reply.map_err(|e| failed(e.to_string()))?;
        if !r.resp.success {
            return Err(failed(answered_failure(&r)));
        }
        tracing::debug!("restore: criu notified {:?}", r.notified);
        drop(work);
        // A detached restore: criu exits after its answer, leaving the tree to the supervisor.
        match swrk.finish() {
            Err(RpcError::TimedOut { .. }) => Err(timed_out()),
            _ => match r.resp.restore.map(|x| x.pid) {
                Some(pid) if pid > 0 => Ok(RestoreOutcome { pid }),
                other => Err(failed(format!("it answered with no restored pid ({other:?})"))),
            },
        }
    }
}

/// The request: the images from `args.images_dir` or its streamer's directory; the service's
/// new stdout as the pipe the dump recorded.
fn restore_request(
    args: &RestoreArgs,
    work: &std::fs::File,
    config: &Path,
    stdout_pipe: Option<BorrowedFd<'_>>,
) -> pb::CriuReq {
    let inherit_fd = match (args.stdout_pipe_inode, stdout_pipe) {
        (Some(inode), Some(fd)) => {
            vec![pb::InheritFd { key: format!("pipe:[{inode}]"), fd: fd.as_raw_fd() }]
        }
        _ => Vec::new(),
    };
    let opts = pb::CriuOpts {
        // A streamer's directory by descriptor: CRIU connects to `/proc/OUR_PID/fd/N/...`,
        // which fits in a socket address whatever the directory's path.
        images_dir_fd: args.streamed_from.unwrap_or(-1),
        images_dir: args.streamed_from.is_none().then(|| args.images_dir.display().to_string()),
        work_dir_fd: Some(work.as_raw_fd()),
        notify_scripts: Some(true),
        log_to_stderr: Some(true),
        log_level: Some(LOG_LEVEL),
        config_file: Some(config.display().to_string()),
        inherit_fd,
        lazy_pages: args.lazy_pages.then_some(true),
        ..Default::default()
    };
    pb::CriuReq { r#type: pb::CriuReqType::Restore as i32, opts: Some(opts), ..Default::default() }
}

/// Kills a restored tree that CRIU holds stopped (at `pre-resume` every task is stopped under
/// ptrace, before `rt_sigreturn`): SIGKILL to every process of it, the root (a child of `criu`)
/// last, and waits for the root to die. A stopped task woken by SIGKILL dies before it returns to
/// user space, so none of them runs again; the rest of its PID namespace dies with the root.
fn kill_stopped_tree(root: i32, criu: i32) {
    use crate::process::tree;
    if !tree::children_of(criu).contains(&root) {
        tracing::warn!("restore: {root} is not a child of criu ({criu}); not killed");
        return;
    }
    let Some(fd) = tree::pidfd(root) else { return };
    for pid in tree::descendants(root).into_iter().rev() {
        // Its processes, stopped by CRIU: none can reap a child, so no pid here is reused.
        if pid != root {
            // SAFETY: kill(2) with no memory arguments.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    // Verified above to be criu's child.
    tree::kill_pidfd_and_wait(&fd, std::time::Duration::from_secs(5));
    tracing::info!("restore: killed the restored tree of {root} before it resumed");
}

/// Waits a little for criu to exit after its answer, so what it leaves is re-parented to us.
fn swrk_wait(swrk: &mut Swrk) -> bool {
    crate::process::tree::exits_within(swrk.pid(), Duration::from_secs(5))
}

/// The status of a request CRIU answered as failed. Its own error text is the last error it
/// logged, which may be one known to be harmless here (the rlimit one every run prints): the
/// log's picked lines say what failed; the errno, when CRIU gives one, goes here.
fn answered_failure(r: &super::rpc::Reply) -> String {
    match r.resp.cr_errno {
        Some(e) if e != 0 => format!("it answered that the request failed: {}", std::io::Error::from_raw_os_error(e)),
        _ => "it answered that the request failed".to_string(),
    }
}

/// A failed request: CRIU's error lines (from the log's end in memory, else the file), after
/// `first` when stasis has its own word to put first.
fn failure(action: &'static str, status: String, recent: &[u8], log: &Path, first: Option<String>) -> CriuError {
    let mut errors: Vec<String> = first.into_iter().collect();
    let mut from_log = pick(&String::from_utf8_lossy(recent));
    if from_log.is_empty() {
        from_log = error_lines(log);
    }
    errors.extend(from_log);
    CriuError::Failed { action, status, log: log.to_path_buf(), errors }
}

/// Writes the one config file CRIU reads for this dump: the service's config file, then each
/// of its `criu.options` as a line (`name value`), so an option overrides the file as it does
/// on a command line. Both were held to the allowlist when the service was loaded.
fn write_config(to: &Path, config_file: &Path, options: &[String]) -> std::io::Result<()> {
    write_config_with(to, config_file, options, false)
}

/// The same, with `stream` (images from stasis's image streamer) last when asked.
fn write_config_with(to: &Path, config_file: &Path, options: &[String], stream: bool) -> std::io::Result<()> {
    let mut text = std::fs::read_to_string(config_file)?;
    text.push('\n');
    let refused = crate::config::criu_options::check(options, false);
    let (uses, _) = crate::config::criu_options::parse(options, false);
    if let Some(r) = refused.first() {
        // Validated at load; a service file changed since is not read again here.
        return Err(std::io::Error::other(format!("criu.options[{}]: {}", r.index, r.error)));
    }
    for (_, u) in uses {
        match u.value {
            Some(v) => text.push_str(&format!("{} {v}\n", u.name)),
            None => text.push_str(&format!("{}\n", u.name)),
        }
    }
    // Last, so nothing can turn it off (no service may set it: see the allowlist).
    if stream {
        text.push_str("stream\n");
    }
    // CRIU reads it once, now: a crash before leaves nothing anyone reads again.
    crate::store::durable::write_atomic_with(to, text.as_bytes(), crate::store::durable::Durability::None)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_follow_the_config_file_as_lines() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("default.conf");
        std::fs::write(&conf, "tcp-established\nnetwork-lock nftables\n").unwrap();
        let out = d.path().join(RPC_CONFIG);
        write_config(
            &out,
            &conf,
            &["--tcp-close".into(), "--network-lock=skip".into(), "--ghost-limit".into(), "2M".into()],
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("tcp-established\nnetwork-lock nftables\n"), "{text}");
        assert!(text.ends_with("tcp-close\nnetwork-lock skip\nghost-limit 2M\n"), "{text}");
        assert!(
            write_config(&out, &conf, &["--action-script=/x".into()]).is_err(),
            "never an option the allowlist refuses"
        );
        write_config_with(&out, &conf, &["--tcp-close".into()], true).unwrap();
        assert!(std::fs::read_to_string(&out).unwrap().ends_with("tcp-close\nstream\n"), "stream comes last");
    }
}
