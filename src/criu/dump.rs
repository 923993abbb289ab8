//! `criu dump` as one RPC conversation (criu::rpc): the options a service may set reach CRIU
//! as one config file (its `criu.config` then its `criu.options`, in the command line's order of
//! precedence), CRIU's log is copied into `dump.log` within caps, and the `post-dump`
//! notification (the images written, the tree still frozen) is answered by the caller, in its
//! own process: a refusal makes CRIU resume the tree instead of ending it.

use super::argv::{DumpArgs, DUMP_LOG};
use super::log_errors::{error_lines, pick};
use super::rpc::{pb, Answer, RpcError, Swrk};
use super::{Criu, CriuError};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

const ACTION: &str = "dump the service";
/// Verbose logs cost little next to a dump and are what makes a failure diagnosable.
const LOG_LEVEL: i32 = 4;
/// The config file CRIU reads for this dump, beside its log.
pub const RPC_CONFIG: &str = "criu-dump.conf";

impl Criu {
    /// Dumps the tree of `args.pid` over RPC within `timeout`; `at_post_dump` decides whether
    /// the dump stands (see the module doc). `spawned` hears criu's pid (progress).
    pub fn dump(
        &self,
        args: &DumpArgs,
        timeout: Duration,
        spawned: &dyn Fn(i32),
        at_post_dump: &mut dyn FnMut() -> Answer,
    ) -> Result<(), CriuError> {
        let deadline = Instant::now() + timeout;
        let log = args.work_dir.join(DUMP_LOG);
        let config = args.work_dir.join(RPC_CONFIG);
        write_config(&config, &args.config_file, &args.options)
            .map_err(|source| CriuError::Spawn { path: config.clone(), source })?;
        // CRIU opens the work dir through /proc/OUR_PID/fd/N: it must stay open meanwhile.
        let work = std::fs::File::open(&args.work_dir)
            .map_err(|source| CriuError::Spawn { path: args.work_dir.clone(), source })?;
        let opts = pb::CriuOpts {
            images_dir_fd: -1,
            images_dir: Some(args.images_dir.display().to_string()),
            work_dir_fd: Some(work.as_raw_fd()),
            pid: Some(args.pid),
            leave_running: Some(args.leave_running),
            notify_scripts: Some(true),
            log_to_stderr: Some(true),
            log_level: Some(LOG_LEVEL),
            config_file: Some(config.display().to_string()),
            ..Default::default()
        };
        let req = pb::CriuReq { r#type: pb::CriuReqType::Dump as i32, opts: Some(opts), ..Default::default() };
        let mut swrk = Swrk::start(&self.path, &[], Some(&log), deadline)
            .map_err(|e| CriuError::Spawn { path: self.path.clone(), source: std::io::Error::other(e.to_string()) })?;
        spawned(swrk.pid());
        let reply = swrk.call(&req, &mut |n| if n.script == "post-dump" { at_post_dump() } else { Answer::Proceed });
        let recent = swrk.take_log();
        let failed = |status: String, first: Option<String>| {
            let mut errors: Vec<String> = first.into_iter().collect();
            let mut from_log = pick(&String::from_utf8_lossy(&recent));
            if from_log.is_empty() {
                from_log = error_lines(&log);
            }
            errors.extend(from_log);
            CriuError::Failed { action: ACTION, status, log: log.clone(), errors }
        };
        match reply {
            Ok(r) if r.resp.success => {
                tracing::debug!("dump: criu notified {:?}", r.notified);
                drop(work);
                match swrk.finish() {
                    Err(RpcError::TimedOut { .. }) => {
                        Err(CriuError::TimedOut { action: ACTION, setting: "dump_timeout", after: timeout, log })
                    }
                    _ => Ok(()),
                }
            }
            Ok(r) => Err(failed(r.failure().unwrap_or_else(|| "it reported a failure".into()), None)),
            Err(RpcError::TimedOut { .. }) => {
                Err(CriuError::TimedOut { action: ACTION, setting: "dump_timeout", after: timeout, log })
            }
            Err(RpcError::Refused { script, refused }) => {
                Err(failed(format!("refused at {script}"), Some(format!("stasis refused the dump: {refused}"))))
            }
            Err(e) => Err(failed(e.to_string(), None)),
        }
    }
}

/// Writes the one config file CRIU reads for this dump: the service's config file, then each
/// of its `criu.options` as a line (`name value`), so an option overrides the file as it does
/// on a command line. Both were held to the allowlist when the service was loaded.
fn write_config(to: &Path, config_file: &Path, options: &[String]) -> std::io::Result<()> {
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
        write_config(&out, &conf, &["--tcp-close".into(), "--network-lock=skip".into(), "--ghost-limit".into(), "2M".into()])
            .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.starts_with("tcp-established\nnetwork-lock nftables\n"), "{text}");
        assert!(text.ends_with("tcp-close\nnetwork-lock skip\nghost-limit 2M\n"), "{text}");
        assert!(write_config(&out, &conf, &["--action-script=/x".into()]).is_err(), "never an option the allowlist refuses");
    }
}
