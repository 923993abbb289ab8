//! Talking to systemd when the supervisor runs as a `Type=notify` unit (`NOTIFY_SOCKET` set):
//! READY=1 once the service runs, STATUS= lines, STOPPING=1, and EXTEND_TIMEOUT_USEC while a
//! restore or a dump is under way, so a big checkpoint is never SIGKILLed mid-dump by a timeout.
//! Without `NOTIFY_SOCKET` every call is a no-op.

use sd_notify::NotifyState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Each extension asks for this much more time...
const EXTEND_BY: Duration = Duration::from_secs(60);
/// ...and is renewed this often while the work goes on.
const EXTEND_EVERY: Duration = Duration::from_secs(20);

fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if enabled() {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!("failed to notify systemd: {e}");
        }
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// Keeps extending systemd's current timeout until dropped.
pub struct Extender {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn extend_while_busy() -> Extender {
    let done = Arc::new(AtomicBool::new(false));
    let thread = enabled().then(|| {
        let done = done.clone();
        std::thread::spawn(move || {
            let usec = EXTEND_BY.as_micros() as u32;
            while !done.load(Ordering::Relaxed) {
                send(&[NotifyState::ExtendTimeoutUsec(usec)]);
                std::thread::park_timeout(EXTEND_EVERY);
            }
        })
    });
    Extender { done, thread }
}

impl Drop for Extender {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
