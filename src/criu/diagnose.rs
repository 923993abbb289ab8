//! Known reasons a dump fails, read from CRIU's error lines, each as one line saying what in
//! the service caused it and the option or setting that fixes it.

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
const HALF_STREAM: &str = "a process outside the service is connected to its unix stream socket {}; CRIU cannot checkpoint half of a stream connection (--ext-unix-sk covers only datagram sockets such as syslog's): have that client disconnect before the stop (an attached tmux client: `tmux detach-client`), then stop again";

/// The same, the other way round: the service is the client of a stream server outside its tree.
const HALF_STREAM_CLIENT: &str = "the service is connected to the unix stream socket {} of a process outside it; CRIU cannot checkpoint half of a stream connection (--ext-unix-sk covers only datagram sockets): the service must close that connection before the stop (or reach the server over TCP)";

/// The first known cause among `errors` (CRIU's error lines), as a sentence.
pub fn diagnose(errors: &[String]) -> Option<String> {
    // The names quoted are the service's (files, sockets): escaped, whoever picked the lines.
    let said = diagnose_raw(errors)?;
    Some(crate::text::escape_lines(&said).into_owned())
}

fn diagnose_raw(errors: &[String]) -> Option<String> {
    match half_stream(errors) {
        Some(HalfStream::Server(name)) => return Some(HALF_STREAM.replace("{}", &name)),
        Some(HalfStream::Client(peer)) => return Some(HALF_STREAM_CLIENT.replace("{}", &peer)),
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
    /// A process outside is connected to the service's socket of this name.
    Server(String),
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
            return Some(match (name.trim(), peer.trim()) {
                // The service's end has no name: it is the client, of a server outside at `peer`.
                ("(null)", peer) => HalfStream::Client(peer.to_string()),
                (name, _) => HalfStream::Server(name.to_string()),
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
            Some("1") | Some("5") => {
                Some(HalfStream::Server(field("name").filter(|n| n != "null").unwrap_or_else(|| "(unnamed)".into())))
            }
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::diagnose;

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
        assert!(!said.contains("add --ext-unix-sk"), "{said}");
        let with_option = vec!["(00.1) Error (criu/sk-unix.c:881): Can't dump half of stream unix connection. name: /run/x.sock; peer name: (null)".to_string()];
        assert!(diagnose(&with_option).unwrap().contains("/run/x.sock"));
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
