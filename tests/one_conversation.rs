//! One checkpoint is one conversation between the supervisor and CRIU: watched through the
//! kernel's process events (the proc connector), the only program started for a stop is criu
//! itself (no stasis hook exec'd by CRIU, no shell), and the dump leaves no marker file or
//! socket behind in the service's state or run directories.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const NETLINK_CONNECTOR: i32 = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const NLMSG_HDR: usize = 16;
const CN_MSG: usize = 20;

/// Process events of the whole host, as the kernel sends them.
struct ProcEvents(OwnedFd);

#[derive(Debug, Clone)]
enum Event {
    /// A new process (not a thread): parent tgid, child pid.
    Fork(i32, i32),
    /// pid, and what it runs (read at once: it may be gone soon).
    Exec(i32, String),
}

impl ProcEvents {
    fn listen() -> ProcEvents {
        // SAFETY: plain socket calls on a descriptor this function owns.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_CONNECTOR);
            assert!(fd >= 0, "failed to open a proc connector socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            addr.nl_groups = CN_IDX_PROC;
            addr.nl_pid = 0;
            let r = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of_val(&addr) as u32,
            );
            assert_eq!(r, 0, "failed to bind the proc connector: {}", std::io::Error::last_os_error());
            let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                16,
            );
            let mut msg = Vec::new();
            let len = (NLMSG_HDR + CN_MSG + 4) as u32;
            msg.extend(len.to_ne_bytes());
            msg.extend((libc::NLMSG_DONE as u16).to_ne_bytes());
            msg.extend(0u16.to_ne_bytes());
            msg.extend(0u32.to_ne_bytes());
            msg.extend(std::process::id().to_ne_bytes());
            msg.extend(CN_IDX_PROC.to_ne_bytes());
            msg.extend(CN_VAL_PROC.to_ne_bytes());
            msg.extend(0u32.to_ne_bytes());
            msg.extend(0u32.to_ne_bytes());
            msg.extend(4u16.to_ne_bytes());
            msg.extend(0u16.to_ne_bytes());
            msg.extend(PROC_CN_MCAST_LISTEN.to_ne_bytes());
            let n = libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0);
            assert_eq!(n, msg.len() as isize, "failed to subscribe to process events");
            ProcEvents(fd)
        }
    }

    /// The events that arrived by now (waits at most 200 ms for the first).
    fn drain(&self, into: &mut Vec<Event>) -> bool {
        let mut buf = vec![0u8; 8192];
        // SAFETY: recv into a buffer we own, within its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return false;
        }
        let mut at = 0usize;
        let n = n as usize;
        while at + NLMSG_HDR <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            if len < NLMSG_HDR || at + len > n {
                break;
            }
            let ev = &buf[at + NLMSG_HDR + CN_MSG..at + len];
            let word = |i: usize| u32::from_ne_bytes(ev[i..i + 4].try_into().unwrap());
            if ev.len() >= 16 + 16 {
                match word(0) {
                    PROC_EVENT_FORK => {
                        let (parent_tgid, child_pid, child_tgid) = (word(20), word(24), word(28));
                        if child_pid == child_tgid {
                            into.push(Event::Fork(parent_tgid as i32, child_pid as i32));
                        }
                    }
                    PROC_EVENT_EXEC => {
                        let pid = word(16) as i32;
                        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
                            .map(|p| p.display().to_string())
                            .or_else(|_| std::fs::read_to_string(format!("/proc/{pid}/comm")))
                            .unwrap_or_else(|_| "(gone before it could be named)".into());
                        into.push(Event::Exec(pid, exe));
                    }
                    _ => {}
                }
            }
            at += (len + 3) & !3;
        }
        true
    }
}

/// Every socket and every file whose name says marker or hook under `dir`.
fn leftovers(dir: &Path, out: &mut Vec<String>) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        let name = e.file_name().to_string_lossy().to_lowercase();
        if ft.is_dir() {
            leftovers(&e.path(), out);
        } else if ft.is_socket() || name.contains("marker") || name.contains("hook") || name.contains("pending") {
            out.push(e.path().display().to_string());
        }
    }
}

#[test]
fn a_stop_runs_criu_and_nothing_else_and_leaves_no_marker_or_socket() {
    one_stop(false);
}

/// With a CRIU kept warm (`warm_criu: on`), the supervisor started criu before the stop, while
/// the service ran: the stop itself starts no program at all, and the dump is that criu's.
#[test]
fn a_stop_with_a_warm_criu_starts_no_program_and_leaves_no_marker_or_socket() {
    one_stop(true);
}

/// The criu processes `pid` started and still has.
fn criu_children(pid: i32) -> Vec<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut kids = Vec::new();
    for t in tasks.flatten() {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        kids.extend(text.split_whitespace().filter_map(|k| k.parse::<i32>().ok()));
    }
    kids.retain(|k| std::fs::read_link(format!("/proc/{k}/exe")).is_ok_and(|e| e.ends_with("criu")));
    kids
}

fn one_stop(warm: bool) {
    let env = Env::new();
    let setting = if warm { "on" } else { "off" };
    std::fs::write(env.path().join("stasis.yaml"), format!("warm_criu: {setting}\n")).unwrap();
    let [kill, http_port] = free_ports::<2>();
    env.write_service("conv", &notes_yaml(kill, http_port, ""));
    env.start("conv");
    wait_for("notes to answer", || http_json(http_port));
    http(http_port, "POST", "/notes", "kept").expect("post a note");
    let st = env.status("conv");
    let supervisor = pid_in(&st["supervisor_pid"]).expect("a supervisor pid");
    let service = pid_in(&st["pid"]).expect("a service pid");
    let mut sockets_before = Vec::new();
    leftovers(&env.state_dir(), &mut sockets_before);
    let warm_criu = if warm {
        wait_for("a warm criu", || criu_children(supervisor).first().copied())
    } else {
        assert_eq!(criu_children(supervisor), Vec::<i32>::new(), "warm_criu: off, yet a criu waits");
        0
    };

    let events = ProcEvents::listen();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Events are read as they come, so each new program is named while it still runs.
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || events.drain(&mut seen) {
                events.drain(&mut seen);
            }
            seen
        })
    };
    let lines = kill_port(kill);
    assert!(lines.last().is_some_and(|l| l.starts_with("OK checkpoint ")), "{lines:?}");
    wait_for("the supervisor to exit", || (env.status("conv")["state"] == "stopped").then_some(()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();

    // The supervisor's new processes (and theirs), apart from the service's own tree.
    let mut parent_of: BTreeMap<i32, i32> = BTreeMap::new();
    let mut ours: BTreeSet<i32> = BTreeSet::from([supervisor]);
    // A warm criu was the supervisor's before the stop: what it starts is the checkpoint's too.
    if warm {
        ours.insert(warm_criu);
        parent_of.insert(warm_criu, supervisor);
    }
    let mut service_tree: BTreeSet<i32> = BTreeSet::from([service]);
    let mut execs: Vec<(i32, String)> = Vec::new();
    for e in &seen {
        match e {
            Event::Fork(parent, child) if service_tree.contains(parent) => {
                service_tree.insert(*child);
            }
            Event::Fork(parent, child) if ours.contains(parent) => {
                ours.insert(*child);
                parent_of.insert(*child, *parent);
            }
            Event::Exec(pid, exe) if ours.contains(pid) && !service_tree.contains(pid) => {
                execs.push((*pid, exe.clone()))
            }
            _ => {}
        }
    }
    eprintln!("the supervisor's programs during the stop: {execs:?} (of {} new processes)", ours.len() - 1);
    // Started by the supervisor itself: criu, once; or nothing, with the warm criu doing the dump.
    let direct: Vec<&(i32, String)> = execs.iter().filter(|(p, _)| parent_of.get(p) == Some(&supervisor)).collect();
    let dumper = if warm {
        assert_eq!(direct.len(), 0, "the supervisor started a program with a warm criu waiting: {execs:?}");
        assert!(!Path::new(&format!("/proc/{warm_criu}")).exists(), "the warm criu {warm_criu} outlived the dump");
        warm_criu
    } else {
        assert_eq!(direct.len(), 1, "one program started by the supervisor for one checkpoint: {execs:?}");
        assert!(direct[0].1.ends_with("/criu"), "the supervisor started {} for the checkpoint, not criu", direct[0].1);
        direct[0].0
    };

    // Anything else was started by criu for its own work (tar for a tmpfs, ip or iptables for a
    // network namespace): never stasis, which CRIU used to run as its action script.
    let stasis = std::fs::canonicalize(env!("CARGO_BIN_EXE_stasis")).unwrap();
    for (pid, exe) in &execs {
        assert_ne!(Path::new(exe), stasis.as_path(), "criu ran stasis (pid {pid}): {execs:?}");
        assert!(!exe.ends_with("/stasis") && !exe.starts_with("stasis"), "criu ran {exe} (pid {pid})");
        let mut up = *pid;
        while parent_of.get(&up).is_some_and(|p| *p != supervisor) {
            up = parent_of[&up];
        }
        assert_eq!(up, dumper, "pid {pid} ({exe}) was not started by criu");
    }

    let mut after = Vec::new();
    leftovers(&env.state_dir(), &mut after);
    let sup_run = env.path().join("run");
    leftovers(&sup_run, &mut after);
    assert!(after.is_empty(), "the dump left behind: {after:?} (before it: {sockets_before:?})");

    let restored = env.start("conv");
    assert_eq!(restored["started_from"], "checkpoint");
    let notes = wait_for("restored notes to answer", || http_json(http_port));
    assert_eq!(notes["notes"][0], "kept");
    env.ok(&["stop", "conv", "--no-checkpoint"]);
}
