//! The supervisor's state machine, pure: (state, event) -> (state, actions). The event loop
//! feeds it events and carries out the actions; nothing here does I/O.

use crate::store::DumpKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Checkpointing {
        kind: DumpKind,
        /// The service exited while the dump ran (CRIU kills it at the end of a stopping dump).
        service_gone: bool,
        /// A terminate signal arrived during the dump; honour it once the dump is done.
        terminate_after: bool,
        /// A stop came during a dump that leaves the service running: a stopping dump follows.
        stop_after: bool,
        /// `stasis doctor`: a dump that is thrown away, to learn whether one would work.
        dry: bool,
    },
    /// Stopping without a checkpoint: SIGTERM sent, SIGKILL after the grace period.
    Stopping,
    Stopped,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The kill port (Stop) or `stasis checkpoint` (KeepRunning).
    DumpRequested(DumpKind),
    /// `checkpoint_every` has passed since the last checkpoint.
    PeriodicDue,
    /// `stasis doctor`: would a checkpoint work now?
    DoctorRequested,
    DumpSucceeded,
    DumpFailed,
    ServiceExited,
    /// SIGTERM or SIGINT to the supervisor.
    Terminate,
    GraceExpired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    StartDump(DumpKind),
    /// A leave-running dump into a scratch directory, discarded after.
    StartDryRun,
    /// Answer the new request: busy, or the service is going away.
    RejectRequest,
    /// The new request asks for what is already under way: it gets the same outcome.
    JoinDump,
    /// The new request (a stop) waits for the dump under way, then gets a dump of its own.
    QueueRequest,
    /// Send the dump's outcome to everyone waiting for it.
    ReplyToDumpWaiters,
    TerminateService,
    KillService,
    /// Wait until the service is gone and its output drained, record the state, exit.
    Finish,
}

pub fn next(state: State, event: Event) -> (State, Vec<Action>) {
    use Action::*;
    use Event::*;
    use State::*;
    let dumping =
        |kind| Checkpointing { kind, service_gone: false, terminate_after: false, stop_after: false, dry: false };
    match (state, event) {
        (Running, DoctorRequested) => (
            Checkpointing {
                kind: DumpKind::KeepRunning,
                service_gone: false,
                terminate_after: false,
                stop_after: false,
                dry: true,
            },
            vec![StartDryRun],
        ),
        // A real dump that leaves the service running answers the question as well.
        (Checkpointing { kind, .. }, DoctorRequested) if kind.leaves_running() => (state, vec![JoinDump]),
        (_, DoctorRequested) => (state, vec![RejectRequest]),
        // A dry run does not give a checkpoint: asking for one during it is turned away.
        (Checkpointing { dry: true, .. }, DumpRequested(DumpKind::KeepRunning)) => (state, vec![RejectRequest]),
        (Running, DumpRequested(kind)) => (dumping(kind), vec![StartDump(kind)]),
        (Running, PeriodicDue) => (dumping(DumpKind::Periodic), vec![StartDump(DumpKind::Periodic)]),
        (Running, ServiceExited) => (Failed, vec![Finish]),
        (Running, Terminate) => (Stopping, vec![TerminateService]),
        (Running, DumpSucceeded | DumpFailed | GraceExpired) => (Running, vec![]),

        (Checkpointing { kind, dry: false, .. }, DumpRequested(asked)) if kind == asked => (state, vec![JoinDump]),
        // Both leave the service running: an on-demand checkpoint during a periodic one is it.
        (Checkpointing { kind, .. }, DumpRequested(DumpKind::KeepRunning)) if kind.leaves_running() => {
            (state, vec![JoinDump])
        }
        (Checkpointing { kind, service_gone, terminate_after, dry, .. }, DumpRequested(DumpKind::Stop))
            if kind.leaves_running() =>
        {
            (Checkpointing { kind, service_gone, terminate_after, stop_after: true, dry }, vec![QueueRequest])
        }
        (Checkpointing { .. }, DumpRequested(_)) => (state, vec![RejectRequest]),
        (Checkpointing { .. }, PeriodicDue) => (state, vec![]),
        (Checkpointing { kind, terminate_after, stop_after, dry, .. }, ServiceExited) => {
            (Checkpointing { kind, service_gone: true, terminate_after, stop_after, dry }, vec![])
        }
        (Checkpointing { kind, service_gone, stop_after, dry, .. }, Terminate) => {
            (Checkpointing { kind, service_gone, terminate_after: true, stop_after, dry }, vec![])
        }
        (Checkpointing { kind: DumpKind::Stop, .. }, DumpSucceeded) => (Stopped, vec![ReplyToDumpWaiters, Finish]),
        (Checkpointing { service_gone, terminate_after, stop_after, .. }, DumpSucceeded | DumpFailed) => {
            if service_gone {
                (Failed, vec![ReplyToDumpWaiters, Finish])
            } else if stop_after {
                (dumping(DumpKind::Stop), vec![ReplyToDumpWaiters, StartDump(DumpKind::Stop)])
            } else if terminate_after {
                (Stopping, vec![ReplyToDumpWaiters, TerminateService])
            } else {
                (Running, vec![ReplyToDumpWaiters])
            }
        }
        (Checkpointing { .. }, GraceExpired) => (state, vec![]),

        (Stopping, ServiceExited) => (Stopped, vec![Finish]),
        (Stopping, GraceExpired) => (Stopping, vec![KillService]),
        (Stopping, DumpRequested(_)) => (Stopping, vec![RejectRequest]),
        (Stopping, _) => (Stopping, vec![]),

        (Stopped | Failed, DumpRequested(_)) => (state, vec![RejectRequest]),
        (Stopped | Failed, _) => (state, vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use Event::*;

    fn run(events: &[Event]) -> (State, Vec<Action>) {
        let mut s = State::Running;
        let mut all = Vec::new();
        for e in events {
            let (n, a) = next(s, *e);
            s = n;
            all.extend(a);
        }
        (s, all)
    }

    #[test]
    fn kill_port_dump_stops_the_service() {
        let (s, a) = run(&[DumpRequested(DumpKind::Stop), ServiceExited, DumpSucceeded]);
        assert_eq!(s, State::Stopped);
        assert_eq!(a, vec![StartDump(DumpKind::Stop), ReplyToDumpWaiters, Finish]);
    }

    #[test]
    fn failed_dump_keeps_the_service_running() {
        let (s, a) = run(&[DumpRequested(DumpKind::Stop), DumpFailed]);
        assert_eq!(s, State::Running);
        assert_eq!(a, vec![StartDump(DumpKind::Stop), ReplyToDumpWaiters]);
    }

    #[test]
    fn a_checkpoint_request_during_a_stop_is_rejected() {
        let (_, a) = run(&[DumpRequested(DumpKind::Stop), DumpRequested(DumpKind::KeepRunning)]);
        assert_eq!(a, vec![StartDump(DumpKind::Stop), RejectRequest]);
    }

    #[test]
    fn a_stop_during_a_running_checkpoint_waits_for_it_then_stops() {
        let (s, a) = run(&[PeriodicDue, DumpRequested(DumpKind::Stop), DumpSucceeded, DumpSucceeded]);
        assert_eq!(s, State::Stopped);
        assert_eq!(
            a,
            vec![
                StartDump(DumpKind::Periodic),
                QueueRequest,
                ReplyToDumpWaiters,
                StartDump(DumpKind::Stop),
                ReplyToDumpWaiters,
                Finish
            ]
        );
    }

    #[test]
    fn periodic_checkpoints_run_only_while_the_service_runs_and_join_on_demand_ones() {
        let (s, a) = run(&[PeriodicDue, DumpRequested(DumpKind::KeepRunning), PeriodicDue, DumpSucceeded]);
        assert_eq!(s, State::Running);
        assert_eq!(a, vec![StartDump(DumpKind::Periodic), JoinDump, ReplyToDumpWaiters]);
        assert_eq!(run(&[Terminate, PeriodicDue]).1, vec![TerminateService]);
        assert_eq!(run(&[ServiceExited, PeriodicDue]).1, vec![Finish]);
    }

    #[test]
    fn a_doctor_run_is_its_own_dump_and_gives_no_checkpoint_to_others() {
        let (s, a) = run(&[DoctorRequested, DoctorRequested, DumpRequested(DumpKind::KeepRunning), DumpSucceeded]);
        assert_eq!(s, State::Running);
        assert_eq!(a, vec![StartDryRun, JoinDump, RejectRequest, ReplyToDumpWaiters]);
        // A real running checkpoint answers a doctor; a stop does not.
        assert_eq!(run(&[PeriodicDue, DoctorRequested]).1, vec![StartDump(DumpKind::Periodic), JoinDump]);
        assert_eq!(
            run(&[DumpRequested(DumpKind::Stop), DoctorRequested]).1,
            vec![StartDump(DumpKind::Stop), RejectRequest]
        );
        // A stop during a dry run waits for it, then takes a real checkpoint.
        let (s, a) = run(&[DoctorRequested, DumpRequested(DumpKind::Stop), DumpSucceeded, DumpSucceeded]);
        assert_eq!(s, State::Stopped);
        assert_eq!(
            a,
            vec![StartDryRun, QueueRequest, ReplyToDumpWaiters, StartDump(DumpKind::Stop), ReplyToDumpWaiters, Finish]
        );
    }

    #[test]
    fn a_second_stop_during_a_stop_waits_for_the_same_checkpoint() {
        let (s, a) = run(&[DumpRequested(DumpKind::Stop), DumpRequested(DumpKind::Stop), DumpSucceeded]);
        assert_eq!(s, State::Stopped);
        assert_eq!(a, vec![StartDump(DumpKind::Stop), JoinDump, ReplyToDumpWaiters, Finish]);
    }

    #[test]
    fn terminate_during_a_dump_waits_for_it() {
        let (s, a) = run(&[DumpRequested(DumpKind::KeepRunning), Terminate, DumpSucceeded]);
        assert_eq!(s, State::Stopping);
        assert_eq!(a, vec![StartDump(DumpKind::KeepRunning), ReplyToDumpWaiters, TerminateService]);
    }

    #[test]
    fn a_service_that_exits_by_itself_has_failed() {
        assert_eq!(run(&[ServiceExited]).0, State::Failed);
        assert_eq!(run(&[DumpRequested(DumpKind::KeepRunning), ServiceExited, DumpFailed]).0, State::Failed);
    }

    #[test]
    fn stopping_escalates_to_kill_after_the_grace_period() {
        let (s, a) = run(&[Terminate, GraceExpired, ServiceExited]);
        assert_eq!(s, State::Stopped);
        assert_eq!(a, vec![TerminateService, KillService, Finish]);
    }
}
