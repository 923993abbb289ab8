//! `restart:`: whether to bring back a service that exited by itself, after how long, and from
//! what. Pure bookkeeping (the event loop sleeps and starts); the clock is passed in.
//!
//! The delay starts at `restart_backoff` and doubles up to 60 s; a run that lasted longer than
//! that resets it. Past `restart_limit` restarts within its window the supervisor gives up.
//! With `restart_from: checkpoint`, a service restored from checkpoint G that exits again has
//! proved G (and everything taken after it, which holds G's memory) bad: the next restart
//! restores something older, and after the oldest, cold.

use crate::config::{RestartFrom, RestartLimit, RestartPolicy, Service, MAX_RESTART_BACKOFF};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How the service's run ended, as far as `restart: on-failure` cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Status(i32),
    Signal(i32),
    /// Reaped by someone else, or never seen: treated as a failure.
    Unknown,
}

impl Exit {
    fn failed(self) -> bool {
        self != Exit::Status(0)
    }

    /// The service's status from its namespace init's exit code, which is the command's exit
    /// code or 128 + N when signal N killed it (src/process/ns_init.rs): the init cannot die of
    /// that signal itself. A command that exits with 129 to 192 by itself reads as a signal, as
    /// in a shell; a failure either way.
    pub fn from_init_code(code: i32) -> Exit {
        match code - 128 {
            n @ 1..=64 => Exit::Signal(n),
            _ => Exit::Status(code),
        }
    }

    /// "exited with status N" / "was killed by SIGKILL", after "the service".
    pub fn describe(self) -> String {
        match self {
            Exit::Status(code) => format!("exited with status {code}"),
            Exit::Signal(n) => match nix::sys::signal::Signal::try_from(n) {
                Ok(sig) => format!("was killed by {sig}"),
                Err(_) => format!("was killed by signal {n}"),
            },
            Exit::Unknown => "exited".to_string(),
        }
    }
}

/// What to do once the service has exited by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `restart: no`, or a clean exit under `on-failure`.
    Stay,
    Restart {
        after: Duration,
        /// Restore a checkpoint whose generation is below this (None: any), or cold when
        /// `cold` is set.
        below_generation: Option<u64>,
        cold: bool,
        /// This restart's number within the current window, for the log.
        number: u32,
    },
    /// The text says why, for the status and the log.
    GiveUp(String),
}

pub struct Restarts {
    policy: RestartPolicy,
    from: RestartFrom,
    first_delay: Duration,
    limit: RestartLimit,
    recent: VecDeque<Instant>,
    delay: Duration,
    /// Generations at and above this crashed after a restore: never restored again by a restart.
    poisoned_from: Option<u64>,
}

impl Restarts {
    pub fn new(s: &Service) -> Restarts {
        Restarts {
            policy: s.restart,
            from: s.restart_from,
            first_delay: s.restart_backoff,
            limit: s.restart_limit,
            recent: VecDeque::new(),
            delay: s.restart_backoff,
            poisoned_from: None,
        }
    }

    /// The run that began at `began` ended with `exit` at `now`; it had been restored from a
    /// checkpoint of `restored_generation` (None: a cold start).
    pub fn after_exit(
        &mut self,
        exit: Exit,
        began: Instant,
        now: Instant,
        restored_generation: Option<u64>,
    ) -> Decision {
        let wanted = match self.policy {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure => exit.failed(),
            RestartPolicy::Always => true,
        };
        if !wanted {
            return Decision::Stay;
        }
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > self.limit.within) {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.limit.count as usize {
            return Decision::GiveUp(format!(
                "gave up: it exited {} times within {} (restart_limit: {} in {})",
                self.recent.len() + 1,
                crate::time_fmt::human_duration(self.limit.within),
                self.limit.count,
                crate::time_fmt::human_duration(self.limit.within)
            ));
        }
        if now.duration_since(began) > MAX_RESTART_BACKOFF {
            self.delay = self.first_delay;
        }
        let after = self.delay;
        self.delay = (self.delay * 2).min(MAX_RESTART_BACKOFF);
        self.recent.push_back(now);
        if let Some(g) = restored_generation {
            self.poisoned_from = Some(self.poisoned_from.map_or(g, |p| p.min(g)));
        }
        let cold = self.from == RestartFrom::Cold || self.poisoned_from == Some(0);
        Decision::Restart { after, below_generation: self.poisoned_from, cold, number: self.recent.len() as u32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        let dirs = crate::paths::Dirs::new(
            "/nonexistent/conf".into(),
            "/nonexistent/state".into(),
            "/nonexistent/run".into(),
            Some(concat!(env!("CARGO_MANIFEST_DIR"), "/criu-configs").into()),
            "/nonexistent/stasis.yaml".into(),
        );
        let text = format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: 7999\n{yaml}");
        crate::config::parse_and_validate_for_fuzzing(&dirs, &text).unwrap()
    }

    fn restart(d: Decision) -> (Duration, Option<u64>, bool) {
        match d {
            Decision::Restart { after, below_generation, cold, .. } => (after, below_generation, cold),
            other => panic!("not a restart: {other:?}"),
        }
    }

    #[test]
    fn on_failure_restarts_failures_only_with_a_doubling_delay() {
        let mut r = Restarts::new(&service("restart: on-failure\nrestart_backoff: 1s\nrestart_limit: 10 in 10m\n"));
        let t0 = Instant::now();
        assert_eq!(r.after_exit(Exit::Status(0), t0, t0, None), Decision::Stay);
        let delays: Vec<u64> = (0..8)
            .map(|i| restart(r.after_exit(Exit::Signal(9), t0, t0 + Duration::from_secs(i), None)).0.as_secs())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(Restarts::new(&service("")).after_exit(Exit::Status(1), t0, t0, None), Decision::Stay);
    }

    #[test]
    fn the_limit_gives_up_and_old_restarts_leave_the_window() {
        let mut r = Restarts::new(&service("restart: always\nrestart_limit: 2 in 1m\n"));
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert!(matches!(r.after_exit(Exit::Status(0), t0, at(1), None), Decision::Restart { .. }));
        assert!(matches!(r.after_exit(Exit::Status(0), t0, at(2), None), Decision::Restart { .. }));
        let Decision::GiveUp(why) = r.after_exit(Exit::Status(0), t0, at(3), None) else { panic!("gives up") };
        assert!(why.contains("restart_limit: 2 in 1m"), "{why}");
        assert!(matches!(r.after_exit(Exit::Status(0), t0, at(100), None), Decision::Restart { .. }));
    }

    #[test]
    fn a_restored_run_that_crashes_poisons_its_checkpoint_and_newer_ones() {
        let mut r = Restarts::new(&service("restart: on-failure\nrestart_from: checkpoint\n"));
        let t0 = Instant::now();
        assert_eq!(restart(r.after_exit(Exit::Status(1), t0, t0, Some(9))).1, Some(9));
        assert_eq!(restart(r.after_exit(Exit::Status(1), t0, t0, Some(4))).1, Some(4));
        assert_eq!(restart(r.after_exit(Exit::Status(1), t0, t0, Some(7))).1, Some(4), "never climbs back up");
        let (_, _, cold) = restart(r.after_exit(Exit::Status(1), t0, t0, None));
        assert!(!cold, "a cold run's crash poisons nothing");
        let mut c = Restarts::new(&service("restart: on-failure\n"));
        assert!(restart(c.after_exit(Exit::Status(1), t0, t0, None)).2, "restart_from: cold");
    }

    #[test]
    fn the_inits_exit_code_carries_the_commands_signal() {
        assert_eq!(Exit::from_init_code(0), Exit::Status(0));
        assert_eq!(Exit::from_init_code(1), Exit::Status(1));
        assert_eq!(Exit::from_init_code(128), Exit::Status(128));
        assert_eq!(Exit::from_init_code(137), Exit::Signal(9));
        assert_eq!(Exit::from_init_code(143), Exit::Signal(15));
        assert_eq!(Exit::from_init_code(255), Exit::Status(255));
        assert_eq!(Exit::Signal(9).describe(), "was killed by SIGKILL");
        assert_eq!(Exit::Status(0).describe(), "exited with status 0");
        let mut r = Restarts::new(&service("restart: on-failure\n"));
        let t0 = Instant::now();
        assert!(matches!(r.after_exit(Exit::from_init_code(137), t0, t0, None), Decision::Restart { .. }));
    }

    #[test]
    fn a_long_run_resets_the_delay() {
        let mut r = Restarts::new(&service("restart: always\nrestart_backoff: 2s\nrestart_limit: 10 in 1h\n"));
        let t0 = Instant::now();
        restart(r.after_exit(Exit::Status(0), t0, t0, None));
        assert_eq!(restart(r.after_exit(Exit::Status(0), t0, t0, None)).0, Duration::from_secs(4));
        let later = t0 + Duration::from_secs(600);
        assert_eq!(
            restart(r.after_exit(Exit::Status(0), later - Duration::from_secs(300), later, None)).0,
            Duration::from_secs(2)
        );
    }
}
