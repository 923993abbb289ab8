//! Known reasons a dump fails, read from CRIU's error lines, each as one line saying what in
//! the service caused it and the option or setting that fixes it; for what no option can fix
//! (an io_uring, a perf event, a stream peer outside the tree), which process holds it, why
//! CRIU cannot take it, and how to stop the service anyway. CRIU's own lines follow as detail.

/// One known cause: what CRIU's error line contains, and how to say it (`{}` is the path or
/// figure CRIU names, when the pattern has one).
struct Known {
    contains: &'static str,
    /// Where the named thing starts and ends in the line, if it names one.
    between: Option<(&'static str, &'static str)>,
    says: &'static str,
}

const KNOWN: &[Known] = &[
    Known {
        contains: "Can't create link remap for",
        between: Some(("Can't create link remap for ", ". Use")),
        says: "{} is open but its name was removed (the file lives on under another name); add --link-remap to criu.options (the default criu config has it)",
    },
    Known {
        contains: "Can't dump ghost file",
        between: Some(("Can't dump ghost file ", " of ")),
        says: "{} is deleted but still open and bigger than CRIU's ghost-file limit (1 MiB unless set); add `--ghost-limit 1G` (or more) to criu.options",
    },
    Known {
        contains: "Connected TCP socket, consider using",
        between: None,
        says: "the service has established TCP connections; use the `default` criu config (it has tcp-established) or add --tcp-close to criu.options",
    },
    Known {
        contains: "External socket is used",
        between: None,
        says: "the service holds a unix datagram socket connected to a process outside its tree (journald, syslog); add --ext-unix-sk to criu.options (the default criu config has it; the peer must be listening again at the restore)",
    },
    Known {
        contains: "In-flight connections can be ignored",
        between: None,
        says: "a client connected while the service was frozen; add --skip-in-flight to criu.options (the default criu config has it)",
    },
    Known {
        contains: "has uprobes vma",
        between: None,
        says: "the service is traced with uprobes; add --allow-uprobes to criu.options",
    },
];

/// Said when a process outside the tree holds the other end of a unix stream connection to it:
/// no CRIU option can checkpoint half of one, so the fix is on the operator's side.
const HALF_STREAM: &str = "a process outside the service{who} is connected to its unix stream socket {}; CRIU cannot checkpoint half of a stream connection (--ext-unix-sk covers only datagram sockets such as syslog's): have that client disconnect before the stop (an attached tmux client: `tmux detach-client`), then stop again";

/// The same, the other way round: the service is the client of a stream server outside its tree.
const HALF_STREAM_CLIENT: &str = "the service is connected to the unix stream socket {} of a process outside it; CRIU cannot checkpoint half of a stream connection (--ext-unix-sk covers only datagram sockets): the service must close that connection before the stop (or reach the server over TCP)";

/// The way out when nothing can make the dump work; `{}` is the service's name.
const STOP_ANYWAY: &str =
    "to stop {} anyway, without a checkpoint (its memory is not kept): `stasis stop {} --no-checkpoint`";

/// The first known cause among `errors` (CRIU's error lines) of a dump of `service`, as a
/// sentence. Processes it names are looked up in /proc (the tree is still running: a failed
/// dump resumes it).
pub fn diagnose(errors: &[String], service: &str) -> Option<String> {
    diagnose_with(errors, service, &Proc)
}

fn diagnose_with(errors: &[String], service: &str, procs: &dyn Processes) -> Option<String> {
    // The names quoted are the service's (files, sockets, command lines): escaped, whoever
    // picked the lines.
    let said = diagnose_raw(errors, service, procs)?;
    Some(crate::text::escape_lines(&said).into_owned())
}

fn diagnose_raw(errors: &[String], service: &str, procs: &dyn Processes) -> Option<String> {
    let anyway = STOP_ANYWAY.replace("{}", service);
    if let Some(u) = undumpable(errors) {
        return Some(u.say(procs, &anyway));
    }
    match half_stream(errors) {
        Some(HalfStream::Server(name, peer_ino)) => {
            let who = peer_ino
                .and_then(|ino| procs.holding(&format!("socket:[{ino}]")))
                .map(|pid| format!(" (pid {pid}, {})", procs.command(pid)))
                .unwrap_or_default();
            return Some(format!("{}; {anyway}", HALF_STREAM.replace("{who}", &who).replace("{}", &name)));
        }
        Some(HalfStream::Client(peer)) => {
            return Some(format!("{}; {anyway}", HALF_STREAM_CLIENT.replace("{}", &peer)))
        }
        None => {}
    }
    for line in errors {
        for k in KNOWN {
            if !line.contains(k.contains) {
                continue;
            }
            let named = k
                .between
                .and_then(|(a, b)| {
                    let rest = &line[line.find(a)? + a.len()..];
                    Some(rest[..rest.find(b).unwrap_or(rest.len())].trim().to_string())
                })
                .unwrap_or_default();
            return Some(k.says.replace("{}", &named));
        }
    }
    None
}

enum HalfStream {
    /// A process outside is connected to the service's socket of this name, from its socket of
    /// this inode when CRIU said it.
    Server(String, Option<u64>),
    /// The service is connected to a server outside, listening at this name.
    Client(String),
}

/// The socket named when the external peer CRIU refused is a stream (or seqpacket) socket:
/// its `Runaway socket` debug line (just before the error) says `type 1` or `type 5`, or, with
/// --ext-unix-sk, CRIU says so itself.
fn half_stream(errors: &[String]) -> Option<HalfStream> {
    for (i, line) in errors.iter().enumerate() {
        if let Some(rest) = line.split("Can't dump half of stream unix connection. name: ").nth(1) {
            let (name, peer) = rest.split_once("; peer name: ").unwrap_or((rest, ""));
            // Its debug line just before (`Ext stream not supported: ino ..`) describes the
            // outside end: its inode finds the process that holds it.
            let peer_ino = errors[..i]
                .iter()
                .rev()
                .take(3)
                .find(|l| l.contains("Ext stream not supported:"))
                .and_then(|l| l.split_whitespace().skip_while(|w| *w != "ino").nth(1)?.parse().ok());
            return Some(match (name.trim(), peer.trim()) {
                // The service's end has no name: it is the client, of a server outside at `peer`.
                ("(null)", peer) => HalfStream::Client(peer.to_string()),
                (name, _) => HalfStream::Server(name.to_string(), peer_ino),
            });
        }
        if !line.contains("External socket is used") {
            continue;
        }
        let runaway = errors[..i].iter().rev().find(|l| l.contains("Runaway socket:"))?;
        let field = |key: &str| {
            let mut words = runaway.split_whitespace().skip_while(|w| *w != key);
            words.nth(1).map(str::to_string)
        };
        return match field("type").as_deref() {
            Some("1") | Some("5") => Some(HalfStream::Server(
                field("name").filter(|n| n != "null").unwrap_or_else(|| "(unnamed)".into()),
                field("peer_ino").and_then(|i| i.parse().ok()),
            )),
            _ => None,
        };
    }
    None
}

/// Kernel objects behind an `anon_inode:` fd that CRIU 4.2.1 cannot dump (files.c hands every
/// kind but eventfd, eventpoll, inotify, fanotify, signalfd, timerfd, pidfd and, when built
/// with libbpf, bpf-map to `dump_unsupp_fd`; an io_uring's rings mapped into memory already
/// stop it while it reads the mappings, proc_parse.c's "Unknown shit"): the part of the fd's
/// name to look for, what it is, and why CRIU cannot take it.
const KINDS: &[(&str, &str, &str)] = &[
    (
        "[io_uring]",
        "an io_uring instance (asynchronous I/O rings shared with the kernel)",
        "CRIU cannot save an io_uring: its rings and the requests in flight live in the kernel",
    ),
    (
        "[userfaultfd]",
        "a userfaultfd (the process serves page faults of its own memory)",
        "CRIU cannot save a process's own userfaultfd: which memory it watches and the faults pending",
    ),
    (
        "[perf_event]",
        "a perf event (a hardware counter or a trace, as a profiler opens)",
        "CRIU cannot save perf events: their counters and buffers live in the kernel",
    ),
    ("bpf-prog", "a BPF program loaded into the kernel", "CRIU cannot save BPF programs"),
    ("bpf_link", "a BPF link (a BPF program attached to a hook)", "CRIU cannot save BPF links"),
    ("bpf-map", "a BPF map", "this CRIU saves BPF maps only when it was built with libbpf, and only of some types"),
    ("kvm-", "a KVM virtual machine", "CRIU cannot save a virtual machine's state in the kernel"),
    ("[fscontext]", "a filesystem mount context (fsopen)", "CRIU cannot save mount contexts"),
    ("[landlock-ruleset]", "a Landlock ruleset", "CRIU cannot save Landlock rulesets"),
    ("[secretmem]", "secret memory (memfd_secret)", "its pages are hidden from every other process, CRIU's included"),
    ("sync_file", "a GPU or device fence (sync_file)", "CRIU cannot save device state"),
];

/// The processes a diagnosis names, looked up by pid: /proc, or a fake in tests.
trait Processes {
    /// The command line, shortened, for a message (escaped by the caller).
    fn command(&self, pid: i32) -> String;
    /// The fds of `pid` whose link reads `link` (`anon_inode:[io_uring]`).
    fn fds(&self, pid: i32, link: &str) -> Vec<i32>;
    /// A process holding an fd whose link reads `link` (`socket:[INODE]`).
    fn holding(&self, link: &str) -> Option<i32>;
}

struct Proc;

/// What is shown of a command line at most.
const COMMAND_MAX: usize = 200;

impl Processes for Proc {
    fn command(&self, pid: i32) -> String {
        // The service's own bytes (it can rewrite its argv): capped here, escaped by the caller.
        let mut raw = Vec::new();
        if let Ok(f) = std::fs::File::open(format!("/proc/{pid}/cmdline")) {
            let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, COMMAND_MAX as u64 + 1), &mut raw);
        }
        let mut text = String::from_utf8_lossy(&raw).replace('\0', " ").trim().to_string();
        if text.is_empty() {
            return "command unknown".into();
        }
        if raw.len() > COMMAND_MAX {
            text = text.chars().take(COMMAND_MAX).collect::<String>() + "...";
        }
        format!("`{text}`")
    }

    fn fds(&self, pid: i32, link: &str) -> Vec<i32> {
        let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == link))
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        fds.sort_unstable();
        fds
    }

    fn holding(&self, link: &str) -> Option<i32> {
        // Only links are read (never followed), so a process that is gone or changing is
        // merely not found.
        std::fs::read_dir("/proc").ok()?.filter_map(Result::ok).find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            (!self.fds(pid, link).is_empty()).then_some(pid)
        })
    }
}

/// A file CRIU said it cannot dump.
struct Undumpable {
    /// The process, from CRIU's `(pid: N) failed` line.
    pid: Option<i32>,
    /// The fd, when CRIU named it (a mapping has none).
    fd: Option<i32>,
    /// The fd's link: `anon_inode:[io_uring]`, a device path...
    link: String,
    /// Found among the process's mappings (io_uring's rings), not its fds.
    mapped: bool,
    /// CRIU's own sentence for a kind it named (a BPF map's type).
    criu_says: Option<String>,
}

fn undumpable(errors: &[String]) -> Option<Undumpable> {
    let pid = errors.iter().rev().find_map(|l| {
        let rest = l.split("(pid: ").nth(1)?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    });
    for line in errors {
        if let Some(rest) = line.split("Unknown shit ").nth(1) {
            // `MODE (NAME)`: a mapping of a file CRIU cannot reopen.
            let link = rest.split_once(" (").map(|(_, n)| n.trim_end().trim_end_matches(')')).unwrap_or(rest);
            return Some(Undumpable { pid, fd: None, link: link.to_string(), mapped: true, criu_says: None });
        }
        if let Some(rest) = line.split("Can't dump file ").nth(1) {
            // `FD of that type [MODE] (KIND INFO)`, KIND one of anon, chr, reg, unknown.
            let fd = rest.split(' ').next().and_then(|f| f.parse().ok());
            let inner = rest.split_once("] (").map(|(_, i)| i.trim_end().trim_end_matches(')')).unwrap_or_default();
            let (kind, info) = inner.split_once(' ').unwrap_or((inner, ""));
            let link = match kind {
                "anon" if !info.starts_with("anon_inode:") => format!("anon_inode:{info}"),
                _ => info.to_string(),
            };
            return Some(Undumpable { pid, fd, link, mapped: false, criu_says: None });
        }
        if let Some(rest) = line.split("CRIU does not currently support dumping BPF map type ").nth(1) {
            let kind = rest.trim_end().trim_end_matches('!');
            return Some(Undumpable {
                pid,
                fd: None,
                link: "anon_inode:bpf-map".into(),
                mapped: false,
                criu_says: Some(format!("CRIU 4.2.1 cannot save BPF maps of type {kind}")),
            });
        }
    }
    None
}

impl Undumpable {
    fn say(&self, procs: &dyn Processes, anyway: &str) -> String {
        let known = KINDS.iter().find(|(key, _, _)| self.link.contains(key));
        let (what, why) = match known {
            Some((_, what, why)) => (what.to_string(), why.to_string()),
            None if self.link.starts_with("anon_inode:") => (
                format!("a kernel object of kind {}", self.link.trim_start_matches("anon_inode:")),
                "CRIU 4.2.1 does not know how to save that kind".to_string(),
            ),
            None if self.link.is_empty() => ("a file of a kind".into(), "CRIU 4.2.1 cannot save that kind".into()),
            None => (format!("{} (a file of a kind)", self.link), "CRIU 4.2.1 cannot save that kind".into()),
        };
        let why = self.criu_says.clone().unwrap_or(why);
        let fds = match (self.fd, self.pid) {
            (Some(fd), _) => vec![fd],
            (None, Some(pid)) => procs.fds(pid, &self.link),
            (None, None) => Vec::new(),
        };
        let at = match fds.as_slice() {
            [] => String::new(),
            [one] => format!(" at fd {one}"),
            many => format!(" at fds {}", many.iter().map(i32::to_string).collect::<Vec<_>>().join(", ")),
        };
        let holder = match self.pid {
            Some(pid) => format!("pid {pid} ({})", procs.command(pid)),
            None => "a process of the service".into(),
        };
        let mapped = if self.mapped { ", mapped into its memory" } else { "" };
        format!(
            "{holder} holds {what}{at} ({}{mapped}); {why}. No CRIU option changes that: the service must close it before a checkpoint; {anyway}",
            self.link
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{diagnose_with, Processes};

    /// pid 41 runs `uring-demo --port 80` with io_urings at fds 5 and 7; pid 77 is `tmux
    /// attach`, holding socket 51233.
    struct Fake;

    impl Processes for Fake {
        fn command(&self, pid: i32) -> String {
            match pid {
                41 => "`uring-demo --port 80`".into(),
                77 => "`tmux attach`".into(),
                _ => "command unknown".into(),
            }
        }
        fn fds(&self, pid: i32, link: &str) -> Vec<i32> {
            if pid == 41 && link == "anon_inode:[io_uring]" {
                vec![5, 7]
            } else {
                Vec::new()
            }
        }
        fn holding(&self, link: &str) -> Option<i32> {
            (link == "socket:[51233]").then_some(77)
        }
    }

    fn diagnose(lines: &[String]) -> Option<String> {
        diagnose_with(lines, "web", &Fake)
    }

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_io_uring_is_named_with_its_process_fds_why_and_the_way_to_stop_anyway() {
        // Rings mapped: CRIU stops while it reads the mappings.
        let mapped = lines(&[
            "(00.012) Error (criu/proc_parse.c:502): Unknown shit 600 (anon_inode:[io_uring])",
            "(00.012) Error (criu/cr-dump.c:1484): Collect mappings (pid: 41) failed with -1",
        ]);
        let said = diagnose(&mapped).unwrap();
        assert!(said.starts_with("pid 41 (`uring-demo --port 80`) holds an io_uring instance"), "{said}");
        assert!(said.contains(" at fds 5, 7 (anon_inode:[io_uring], mapped into its memory)"), "{said}");
        assert!(said.contains("CRIU cannot save an io_uring"), "{said}");
        assert!(said.ends_with("`stasis stop web --no-checkpoint`"), "{said}");
        // Not mapped: CRIU names the fd.
        let fd = lines(&[
            "(00.02) Error (criu/files-ext.c:94): Can't dump file 9 of that type [600] (anon anon_inode:[io_uring])",
            "(00.02) Error (criu/cr-dump.c:1589): Dump files (pid: 41) failed with -1",
        ]);
        let said = diagnose(&fd).unwrap();
        assert!(
            said.contains("pid 41 (`uring-demo --port 80`) holds an io_uring instance (asynchronous I/O rings shared with the kernel) at fd 9 (anon_inode:[io_uring])"),
            "{said}"
        );
    }

    #[test]
    fn each_kind_criu_cannot_dump_has_a_sentence_and_an_unknown_one_is_still_named() {
        let with = |link: &str| {
            diagnose(&lines(&[
                &format!("Error (criu/files-ext.c:94): Can't dump file 4 of that type [600] (anon {link})"),
                "Error (criu/cr-dump.c:1589): Dump files (pid: 12) failed with -1",
            ]))
            .unwrap()
        };
        assert!(with("anon_inode:[perf_event]").contains("holds a perf event"));
        assert!(with("anon_inode:[userfaultfd]").contains("holds a userfaultfd"));
        assert!(with("anon_inode:bpf-prog").contains("holds a BPF program"));
        assert!(with("anon_inode:kvm-vm").contains("KVM virtual machine"));
        let odd = with("anon_inode:[frobnicator]");
        assert!(
            odd.starts_with(
                "pid 12 (command unknown) holds a kernel object of kind [frobnicator] at fd 4 (anon_inode:[frobnicator])"
            ),
            "{odd}"
        );
        assert!(odd.contains("--no-checkpoint"), "{odd}");
        let bpf =
            diagnose(&lines(&["Error (criu/bpfmap.c:262): CRIU does not currently support dumping BPF map type 27!"]))
                .unwrap();
        assert!(bpf.contains("a BPF map") && bpf.contains("type 27"), "{bpf}");
    }

    #[test]
    fn a_stream_peer_outside_the_tree_is_not_sent_to_ext_unix_sk() {
        let stream = vec![
            "(00.061) \tRunaway socket: ino 51234 peer_ino 51233 family    1 type    1 state  1 name /tmp/t/tmux.sock"
                .to_string(),
            "(00.061) Error (criu/sk-unix.c:874): External socket is used. Consider using --ext-unix-sk option."
                .to_string(),
        ];
        let said = diagnose(&stream).unwrap();
        assert!(said.contains("/tmp/t/tmux.sock") && said.contains("disconnect"), "{said}");
        assert!(said.contains("outside the service (pid 77, `tmux attach`) is connected"), "{said}");
        assert!(said.contains("`stasis stop web --no-checkpoint`"), "{said}");
        assert!(!said.contains("add --ext-unix-sk"), "{said}");
        let with_option = vec!["(00.1) Error (criu/sk-unix.c:881): Can't dump half of stream unix connection. name: /run/x.sock; peer name: (null)".to_string()];
        assert!(diagnose(&with_option).unwrap().contains("/run/x.sock"));
        // With --ext-unix-sk (the default config), CRIU's debug line before describes the
        // outside end (seen with an attached tmux client): its inode names the client.
        let ext = vec![
            "(00.061) \tExt stream not supported: ino 51233 peer_ino 51234 family    1 type    1 state  1 name null"
                .to_string(),
            "(00.1) Error (criu/sk-unix.c:881): Can't dump half of stream unix connection. name: /tmp/t/tmux.sock; peer name: (null)".to_string(),
        ];
        let said = diagnose(&ext).unwrap();
        assert!(said.contains("outside the service (pid 77, `tmux attach`) is connected"), "{said}");
        let client = vec!["(00.1) Error (criu/sk-unix.c:881): Can't dump half of stream unix connection. name: (null); peer name: /run/db.sock".to_string()];
        let said = diagnose(&client).unwrap();
        assert!(said.contains("the service is connected to the unix stream socket /run/db.sock"), "{said}");
        let dgram = vec![
            "(00.061) \tRunaway socket: ino 5 peer_ino 6 family    1 type    2 state  1 name /dev/log".to_string(),
            "(00.061) Error (criu/sk-unix.c:874): External socket is used. Consider using --ext-unix-sk option."
                .to_string(),
        ];
        assert!(diagnose(&dgram).unwrap().contains("--ext-unix-sk"), "a datagram peer keeps the option's advice");
    }

    #[test]
    fn names_the_file_and_the_option() {
        let lines = vec![
            "(00.1) Error (criu/files-reg.c:1122): Can't create link remap for /srv/data/state.db. Use link-remap option.".to_string(),
        ];
        assert_eq!(
            diagnose(&lines).unwrap(),
            "/srv/data/state.db is open but its name was removed (the file lives on under another name); add --link-remap to criu.options (the default criu config has it)"
        );
        let ghost =
            vec!["Error (criu/files-reg.c:1031): Can't dump ghost file /tmp/big of 4194304 size, increase limit"
                .to_string()];
        assert!(diagnose(&ghost).unwrap().starts_with("/tmp/big is deleted but still open"));
        assert!(diagnose(&[
            "Error (criu/sk-unix.c:875): External socket is used. Consider using --ext-unix-sk option.".into()
        ])
        .unwrap()
        .contains("--ext-unix-sk"));
        assert_eq!(diagnose(&["Error (criu/x.c:1): something else".into()]), None);
    }
}
