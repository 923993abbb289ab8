//! Which CRIU options a service may add, decided the way CRIU itself reads them. CRIU 4.2.1
//! parses its argv and its config files with glibc's `getopt_long` over the table below
//! (`long_opts` and the short-option string of criu/config.c): a long option may be
//! abbreviated to any unambiguous prefix (an exact name wins), take its value after `=` or as
//! the next element, and short options may be bundled with an attached value (`-lD/x`). Every
//! `criu.options` entry and every line of a service's CRIU config file is resolved here to the
//! option CRIU would take it for, and only the options on [`ALLOWED`] pass.

/// How an option takes its value (getopt's `has_arg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    No,
    Required,
    Optional,
}

/// One entry of CRIU's `long_opts`. Two prefix matches are one option for getopt when they
/// agree in `arg`, `flag` and `val` (glibc's rule), so those are kept as CRIU has them.
struct LongOpt {
    name: &'static str,
    arg: Arg,
    /// The `opts` field getopt sets itself, "" when it returns `val` instead.
    flag: &'static str,
    val: u32,
}

const fn opt(name: &'static str, arg: Arg, val: u32) -> LongOpt {
    LongOpt { name, arg, flag: "", val }
}

const fn set(name: &'static str, flag: &'static str, val: u32) -> LongOpt {
    LongOpt { name, arg: Arg::No, flag, val }
}

const fn ch(c: char) -> u32 {
    c as u32
}

use Arg::{No, Optional, Required};

/// CRIU 4.2.1's `long_opts`, in its order (the order decides which of equal matches getopt
/// reports). `BOOL_OPT(NAME, FIELD)` is the pair `NAME` (sets 1) and `no-NAME` (sets 0).
#[rustfmt::skip]
const LONG_OPTS: &[LongOpt] = &[
    opt("tree", Required, ch('t')),
    opt("leave-stopped", No, ch('s')),
    opt("leave-running", No, ch('R')),
    set("restore-detached", "restore_detach", 1), set("no-restore-detached", "restore_detach", 0),
    set("restore-sibling", "restore_sibling", 1), set("no-restore-sibling", "restore_sibling", 0),
    set("daemon", "restore_detach", 1), set("no-daemon", "restore_detach", 0),
    opt("images-dir", Required, ch('D')),
    opt("work-dir", Required, ch('W')),
    opt("log-file", Required, ch('o')),
    opt("join-ns", Required, ch('J')),
    opt("root", Required, ch('r')),
    opt("ext-unix-sk", Optional, ch('x')),
    opt("help", No, ch('h')),
    set("tcp-established", "tcp_established_ok", 1), set("no-tcp-established", "tcp_established_ok", 0),
    opt("close", Required, 1043),
    set("log-pid", "log_file_per_pid", 1), set("no-log-pid", "log_file_per_pid", 0),
    opt("version", No, ch('V')),
    set("evasive-devices", "evasive_devices", 1), set("no-evasive-devices", "evasive_devices", 0),
    opt("pidfile", Required, 1046),
    opt("veth-pair", Required, 1047),
    opt("action-script", Required, 1049),
    set("link-remap", "link_remap_ok", 1), set("no-link-remap", "link_remap_ok", 0),
    set("shell-job", "shell_job", 1), set("no-shell-job", "shell_job", 0),
    set("file-locks", "handle_file_locks", 1), set("no-file-locks", "handle_file_locks", 0),
    set("page-server", "use_page_server", 1), set("no-page-server", "use_page_server", 0),
    opt("address", Required, 1051),
    opt("port", Required, 1052),
    opt("prev-images-dir", Required, 1053),
    opt("ms", No, 1054),
    set("track-mem", "track_mem", 1), set("no-track-mem", "track_mem", 0),
    set("auto-dedup", "auto_dedup", 1), set("no-auto-dedup", "auto_dedup", 0),
    opt("libdir", Required, ch('L')),
    opt("cpu-cap", Optional, 1057),
    set("force-irmap", "force_irmap", 1), set("no-force-irmap", "force_irmap", 0),
    opt("ext-mount-map", Required, ch('M')),
    opt("exec-cmd", No, 1059),
    opt("manage-cgroups", Optional, 1060),
    opt("cgroup-root", Required, 1061),
    opt("inherit-fd", Required, 1062),
    opt("feature", Required, 1063),
    opt("skip-mnt", Required, 1064),
    opt("enable-fs", Required, 1065),
    set("enable-external-sharing", "enable_external_sharing", 1),
    set("enable-external-masters", "enable_external_masters", 1),
    opt("freeze-cgroup", Required, 1068),
    opt("ghost-limit", Required, 1069),
    opt("irmap-scan-path", Required, 1070),
    opt("lsm-profile", Required, 1071),
    opt("timeout", Required, 1072),
    opt("external", Required, 1073),
    opt("empty-ns", Required, 1074),
    opt("lazy-pages", No, 1076),
    set("extra", "check_extra_features", 1), set("no-extra", "check_extra_features", 0),
    set("experimental", "check_experimental_features", 1), set("no-experimental", "check_experimental_features", 0),
    opt("all", No, 1079),
    opt("cgroup-props", Required, 1080),
    opt("cgroup-props-file", Required, 1081),
    opt("cgroup-dump-controller", Required, 1082),
    set("skip-in-flight", "tcp_skip_in_flight", 1), set("no-skip-in-flight", "tcp_skip_in_flight", 0),
    set("deprecated", "deprecated_ok", 1), set("no-deprecated", "deprecated_ok", 0),
    set("display-stats", "display_stats", 1), set("no-display-stats", "display_stats", 0),
    set("weak-sysctls", "weak_sysctls", 1), set("no-weak-sysctls", "weak_sysctls", 0),
    opt("status-fd", Required, 1088),
    set("tcp-close", "tcp_close", 1), set("no-tcp-close", "tcp_close", 0),
    opt("verbosity", Optional, ch('v')),
    opt("ps-socket", Required, 1091),
    set("stream", "stream", 1), set("no-stream", "stream", 0),
    opt("config", Required, 1089),
    opt("no-default-config", No, 1090),
    opt("tls-cacert", Required, 1092),
    opt("tls-cacrl", Required, 1093),
    opt("tls-cert", Required, 1094),
    opt("tls-key", Required, 1095),
    set("tls", "tls", 1), set("no-tls", "tls", 0),
    set("tls-no-cn-verify", "tls_no_cn_verify", 1),
    opt("cgroup-yard", Required, 1096),
    opt("pre-dump-mode", Required, 1097),
    opt("file-validation", Required, 1098),
    set("skip-file-rwx-check", "skip_file_rwx_check", 1), set("no-skip-file-rwx-check", "skip_file_rwx_check", 0),
    opt("lsm-mount-context", Required, 1099),
    opt("network-lock", Required, 1100),
    set("mntns-compat-mode", "mntns_compat_mode", 1), set("no-mntns-compat-mode", "mntns_compat_mode", 0),
    set("unprivileged", "unprivileged", 1), set("no-unprivileged", "unprivileged", 0),
    set("ghost-fiemap", "ghost_fiemap", 1), set("no-ghost-fiemap", "ghost_fiemap", 0),
    set("allow-uprobes", "allow_uprobes", 1), set("no-allow-uprobes", "allow_uprobes", 0),
];

/// CRIU's short options (`"dSsRt:hD:o:v::x::Vr:jJ:lW:L:M:"`), each with the long option that
/// has the same effect, which is the name it is judged and reported by.
const SHORT_OPTS: &[(char, Arg, &str)] = &[
    ('d', No, "restore-detached"),
    ('S', No, "restore-sibling"),
    ('s', No, "leave-stopped"),
    ('R', No, "leave-running"),
    ('t', Required, "tree"),
    ('h', No, "help"),
    ('D', Required, "images-dir"),
    ('o', Required, "log-file"),
    ('v', Optional, "verbosity"),
    ('x', Optional, "ext-unix-sk"),
    ('V', No, "version"),
    ('r', Required, "root"),
    ('j', No, "shell-job"),
    ('J', Required, "join-ns"),
    ('l', No, "file-locks"),
    ('W', Required, "work-dir"),
    ('L', Required, "libdir"),
    ('M', Required, "ext-mount-map"),
];

/// What an allowed option's value must be.
#[derive(Debug, Clone, Copy)]
enum Value {
    /// No value at all (`--ext-unix-sk=ID` is refused too).
    None,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A byte count as CRIU's parse_size reads it: digits, then optionally K, M or G.
    Size,
}

/// The options a service file may add: each is documented in docs/configuration.md (the
/// defaults of criu-configs/default.conf and the opt-in ones), names nothing on disk, runs
/// nothing and keeps the dumped tree the one stasis chose.
const ALLOWED: &[(&str, Value, &str)] = &[
    ("tcp-established", Value::None, "checkpoints established TCP connections (default.conf)"),
    ("no-tcp-established", Value::None, "only turns a default off"),
    ("tcp-close", Value::None, "closes established connections instead (the tcp-close config)"),
    ("no-tcp-close", Value::None, "only turns tcp-close off"),
    ("network-lock", Value::OneOf(&["nftables", "skip"]), "how connections are held while down; no path, no program"),
    ("file-locks", Value::None, "dumps flock/POSIX/OFD locks (default.conf)"),
    ("no-file-locks", Value::None, "only turns a default off"),
    ("skip-in-flight", Value::None, "leaves out connections nobody accepted yet (default.conf)"),
    ("no-skip-in-flight", Value::None, "only turns a default off"),
    ("link-remap", Value::None, "relinks open unlinked files beside themselves (default.conf)"),
    ("no-link-remap", Value::None, "only turns a default off"),
    ("ext-unix-sk", Value::None, "keeps a datagram socket to an outside server by its path (default.conf)"),
    ("ghost-limit", Value::Size, "a size: how much of a deleted open file is stored"),
    ("allow-uprobes", Value::None, "restores uprobes' memory for traced services"),
    ("no-allow-uprobes", Value::None, "only turns allow-uprobes off"),
];

/// Why an option is never allowed, for those where the reason is more than "not known to be safe".
const NEVER: &[(&[&str], &str)] = &[
    (&["action-script"], "it runs a program as root at every CRIU action"),
    (&["exec-cmd"], "it runs a program as root after the restore"),
    (&["libdir"], "it loads plugin libraries into CRIU, which runs as root"),
    (&["tree"], "it changes which processes are dumped"),
    (&["root"], "it restores the service under another root directory"),
    (
        &["images-dir", "work-dir", "log-file", "pidfile", "prev-images-dir", "cgroup-props-file", "irmap-scan-path"],
        "it names a path that CRIU, as root, reads or writes; stasis sets its own",
    ),
    (&["config", "no-default-config"], "it makes CRIU read another config file"),
    (
        &["tls-cacert", "tls-cacrl", "tls-cert", "tls-key", "lsm-profile", "lsm-mount-context"],
        "it names a file or a security label",
    ),
    (
        &[
            "leave-running",
            "leave-stopped",
            "restore-detached",
            "no-restore-detached",
            "restore-sibling",
            "daemon",
            "inherit-fd",
            "verbosity",
        ],
        "stasis sets it itself (the supervisor depends on it)",
    ),
    (&["close", "status-fd", "ps-socket"], "it names a file descriptor of CRIU's"),
    (
        &["join-ns", "ext-mount-map", "external", "veth-pair", "cgroup-root", "cgroup-yard", "freeze-cgroup"],
        "it reaches outside the service's own namespaces",
    ),
    (&["help", "version", "feature"], "it is a question to CRIU, not a setting"),
];

/// One option as CRIU will read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    /// The canonical long name (`action-script` for `--action-scr=/x` and for `-L`'s `libdir`).
    pub name: &'static str,
    /// The element it was written in, as written.
    pub spelled: String,
    pub value: Option<String>,
}

/// Why an element is refused; the message reads after "failed to use ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("\"{0}\" is not an option; write each option as it appears on criu's command line, e.g. \"--tcp-close\"")]
    NotAnOption(String),
    #[error("\"{0}\" ends CRIU's options; remove it")]
    EndOfOptions(String),
    #[error("\"{0}\" is not an option of CRIU 4.2.1; remove it (options a service may add: {allowed})", allowed = allowed_list())]
    Unknown(String),
    #[error("\"{spelled}\" is ambiguous to CRIU (it could be --{}); write the option in full", candidates.join(", --"))]
    Ambiguous { spelled: String, candidates: Vec<&'static str> },
    #[error("\"{spelled}\" is CRIU's --{name}, which needs a value; give it in the same entry (\"--{name}=VALUE\")")]
    MissingValue { spelled: String, name: &'static str },
    #[error("\"{spelled}\" is CRIU's --{name}, which takes no value; write \"--{name}\"")]
    UnexpectedValue { spelled: String, name: &'static str },
    #[error("\"{spelled}\" is CRIU's --{name}: {why}; remove it (options a service may add: {allowed})", allowed = allowed_list())]
    Refused { spelled: String, name: &'static str, why: &'static str },
    #[error("\"{spelled}\" gives CRIU's --{name} the value {value:?}; {expected}")]
    BadValue { spelled: String, name: &'static str, value: String, expected: String },
    #[error("\"{0}\" would make CRIU read another config file or stop before the dump; remove it")]
    ReadFirst(String),
}

/// A refused element: its index in the list it came from, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub index: usize,
    pub error: OptionError,
}

fn allowed_list() -> String {
    let named: Vec<String> = ALLOWED
        .iter()
        .filter(|(n, _, _)| !n.starts_with("no-"))
        .map(|(n, v, _)| if matches!(v, Value::None) { format!("--{n}") } else { format!("--{n}=VALUE") })
        .collect();
    format!("{}, and --no-NAME of each switch", named.join(", "))
}

/// Resolves `--NAME` (without the dashes, up to any `=`) as glibc does: an exact name wins;
/// otherwise every option it is a prefix of, which must all be the same option.
fn resolve_long(name: &str) -> Result<&'static LongOpt, Vec<&'static str>> {
    if let Some(o) = LONG_OPTS.iter().find(|o| o.name == name) {
        return Ok(o);
    }
    let matches: Vec<&'static LongOpt> = LONG_OPTS.iter().filter(|o| o.name.starts_with(name)).collect();
    match matches.first() {
        None => Err(Vec::new()),
        Some(first) if matches.iter().all(|o| (o.arg, o.flag, o.val) == (first.arg, first.flag, first.val)) => {
            Ok(first)
        }
        Some(_) => Err(matches.iter().map(|o| o.name).collect()),
    }
}

/// Splits `elements` into the options CRIU reads from them, exactly as getopt_long walks an
/// argv: a value may be taken from the next element. `lenient_blanks`: an empty element that
/// is no option's value is skipped, as CRIU skips the empty word a trailing blank makes on a
/// config line; in argv it would be a stray word.
pub fn parse(elements: &[String], lenient_blanks: bool) -> (Vec<(usize, Use)>, Vec<Refusal>) {
    let (mut uses, mut refused) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < elements.len() {
        let el = &elements[i];
        let here = i;
        i += 1;
        macro_rules! refuse {
            ($e:expr) => {
                refused.push(Refusal { index: here, error: $e })
            };
        }
        if el == "--" {
            refuse!(OptionError::EndOfOptions(el.clone()));
        } else if let Some(body) = el.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let o = match resolve_long(name) {
                Ok(o) => o,
                Err(c) if c.is_empty() => {
                    refuse!(OptionError::Unknown(el.clone()));
                    continue;
                }
                Err(candidates) => {
                    refuse!(OptionError::Ambiguous { spelled: el.clone(), candidates });
                    continue;
                }
            };
            let value = match (o.arg, inline) {
                (Arg::No, Some(_)) => {
                    refuse!(OptionError::UnexpectedValue { spelled: el.clone(), name: o.name });
                    continue;
                }
                (Arg::Required, None) => match elements.get(i) {
                    Some(v) => {
                        i += 1;
                        Some(v.clone())
                    }
                    None => {
                        refuse!(OptionError::MissingValue { spelled: el.clone(), name: o.name });
                        continue;
                    }
                },
                (_, v) => v,
            };
            uses.push((here, Use { name: o.name, spelled: el.clone(), value }));
        } else if el.len() > 1 && el.starts_with('-') {
            i = parse_short_bundle(elements, here, &mut uses, &mut refused);
        } else if !(lenient_blanks && el.is_empty()) {
            refuse!(OptionError::NotAnOption(el.clone()));
        }
    }
    (uses, refused)
}

/// `-abc`: each letter an option until one takes a value, which is the rest of the element
/// (or, when required and nothing is left, the next element). Returns the next index.
fn parse_short_bundle(
    elements: &[String],
    at: usize,
    uses: &mut Vec<(usize, Use)>,
    refused: &mut Vec<Refusal>,
) -> usize {
    let el = &elements[at];
    let mut next = at + 1;
    let mut rest = &el[1..];
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        let Some(&(_, arg, name)) = SHORT_OPTS.iter().find(|(s, _, _)| *s == c) else {
            refused.push(Refusal { index: at, error: OptionError::Unknown(el.clone()) });
            return next;
        };
        let value = match arg {
            Arg::No => None,
            _ if !rest.is_empty() => Some(std::mem::take(&mut rest).to_string()),
            Arg::Optional => None,
            Arg::Required => match elements.get(next) {
                Some(v) => {
                    next += 1;
                    Some(v.clone())
                }
                None => {
                    refused.push(Refusal { index: at, error: OptionError::MissingValue { spelled: el.clone(), name } });
                    return next;
                }
            },
        };
        uses.push((at, Use { name, spelled: el.clone(), value }));
    }
    next
}

/// Whether CRIU may be given this option from a service file.
fn judge(u: &Use) -> Result<(), OptionError> {
    let Some((_, rule, _)) = ALLOWED.iter().find(|(n, _, _)| *n == u.name) else {
        let why = NEVER
            .iter()
            .find(|(names, _)| names.contains(&u.name))
            .map(|(_, why)| *why)
            .unwrap_or("it is not on the list of options known to be safe (docs/configuration.md)");
        return Err(OptionError::Refused { spelled: u.spelled.clone(), name: u.name, why });
    };
    let bad = |expected: &str| OptionError::BadValue {
        spelled: u.spelled.clone(),
        name: u.name,
        value: u.value.clone().unwrap_or_default(),
        expected: expected.to_string(),
    };
    match (rule, u.value.as_deref()) {
        (Value::None, None) => Ok(()),
        (Value::None, Some(_)) => Err(bad("it takes no value here")),
        (Value::OneOf(words), Some(v)) if words.contains(&v) => Ok(()),
        (Value::OneOf(words), _) => Err(bad(&format!("use one of: {}", words.join(", ")))),
        (Value::Size, Some(v)) if is_size(v) => Ok(()),
        (Value::Size, _) => Err(bad("write a size such as 1048576, 4M or 1G")),
    }
}

fn is_size(v: &str) -> bool {
    let digits = v.strip_suffix(['K', 'M', 'G']).unwrap_or(v);
    (1..=12).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Checks a list of argv elements (`criu.options`, or the words of a config file).
pub fn check(elements: &[String], lenient_blanks: bool) -> Vec<Refusal> {
    let mut refused: Vec<Refusal> = elements
        .iter()
        .enumerate()
        // CRIU looks for these in every argv element before getopt runs (pre_parse).
        .filter(|(_, e)| e.contains("--config") || *e == "-h" || *e == "--help")
        .map(|(index, e)| Refusal { index, error: OptionError::ReadFirst(e.clone()) })
        .collect();
    let (uses, mut parse_refused) = parse(elements, lenient_blanks);
    refused.append(&mut parse_refused);
    for (index, u) in uses {
        if let Err(error) = judge(&u) {
            refused.push(Refusal { index, error });
        }
    }
    refused.sort_by_key(|r| r.index);
    refused.dedup_by_key(|r| r.index);
    refused
}

/// Why a config file line cannot be read the way stasis is sure CRIU reads it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a quoted or escaped value; write the value plainly (none of the allowed options needs quotes)")]
    Quoted,
    #[error("more than one value after the option; one option per line, `NAME VALUE`")]
    ExtraWords,
}

/// The argv elements CRIU makes of a config file (criu/config.c `parse_statement`): per line,
/// leading blanks skipped, `#` lines and blank lines ignored, the first word (up to the first
/// space, else the first tab) becomes `--WORD`, and the rest, up to a `#`, is its value. Each
/// element comes with its 1-based line.
pub fn config_words(text: &str) -> Result<Vec<(usize, String)>, (usize, LineError)> {
    let mut words = Vec::new();
    for (n, raw) in text.split_inclusive('\n').enumerate() {
        let line = n + 1;
        let body = raw.trim_start_matches(|c: char| c.is_ascii_whitespace() && c != '\n');
        if body.starts_with('\n') || body.starts_with('#') || (body.is_empty() && raw.ends_with('\n')) {
            continue;
        }
        let input = body.strip_suffix('\n').unwrap_or(body);
        let Some(sep) = input.find(' ').or_else(|| input.find('\t')) else {
            words.push((line, format!("--{input}")));
            continue;
        };
        words.push((line, format!("--{}", &input[..sep])));
        let rest = input[sep + 1..].trim_start_matches(|c: char| c.is_ascii_whitespace());
        if rest.starts_with('#') {
            continue;
        }
        let value = rest.split('#').next().unwrap_or_default();
        if value.contains(['"', '\\']) {
            return Err((line, LineError::Quoted));
        }
        let (word, tail) = value.split_once(' ').unwrap_or((value, ""));
        if !tail.trim().is_empty() {
            return Err((line, LineError::ExtraWords));
        }
        words.push((line, word.to_string()));
    }
    Ok(words)
}

/// Every problem of a CRIU config file's text, each with its line.
pub fn check_config_text(text: &str) -> Vec<(usize, String)> {
    let words = match config_words(text) {
        Ok(w) => w,
        Err((line, e)) => return vec![(line, e.to_string())],
    };
    let elements: Vec<String> = words.iter().map(|(_, w)| w.clone()).collect();
    check(&elements, true).into_iter().map(|r| (words[r.index].0, r.error.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(list: &[&str]) -> Vec<(&'static str, Option<String>)> {
        let v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        let (uses, refused) = parse(&v, false);
        assert!(refused.is_empty(), "{list:?}: {refused:?}");
        uses.into_iter().map(|(_, u)| (u.name, u.value)).collect()
    }

    fn refused(list: &[&str]) -> Vec<OptionError> {
        let v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        check(&v, false).into_iter().map(|r| r.error).collect()
    }

    #[test]
    fn prefixes_resolve_as_getopt_does() {
        assert_eq!(names(&["--action-scr=/x"]), [("action-script", Some("/x".into()))]);
        assert_eq!(names(&["--lib=/x"]), [("libdir", Some("/x".into()))]);
        assert_eq!(names(&["--tre=1"]), [("tree", Some("1".into()))]);
        assert_eq!(names(&["--tre", "1"]), [("tree", Some("1".into()))]);
        assert_eq!(names(&["--root="]), [("root", Some(String::new()))]);
        // An exact name wins over the longer names it is a prefix of.
        assert_eq!(names(&["--tls"]), [("tls", None)]);
        assert_eq!(names(&["--cgroup-props", "x"]), [("cgroup-props", Some("x".into()))]);
        // A required value is the next element, whatever it looks like.
        assert_eq!(names(&["--ghost-limit", "--tcp-close"]), [("ghost-limit", Some("--tcp-close".into()))]);
        // An optional one only ever comes after `=`.
        assert_eq!(names(&["--ext-unix-sk", "--tcp-close"]), [("ext-unix-sk", None), ("tcp-close", None)]);
    }

    #[test]
    fn ambiguous_and_unknown_prefixes() {
        let v = vec!["--tcp-".to_string()];
        let (_, r) = parse(&v, false);
        assert!(matches!(&r[0].error, OptionError::Ambiguous { candidates, .. } if candidates.contains(&"tcp-close")));
        let v = vec!["--no-".to_string(), "--nope".to_string(), "--".to_string(), "-q".to_string()];
        let (_, r) = parse(&v, false);
        assert_eq!(r.len(), 4, "{r:?}");
    }

    #[test]
    fn short_options_bundle_and_attach_values() {
        assert_eq!(names(&["-L/x"]), [("libdir", Some("/x".into()))]);
        assert_eq!(names(&["-D", "/x"]), [("images-dir", Some("/x".into()))]);
        assert_eq!(names(&["-lD/x"]), [("file-locks", None), ("images-dir", Some("/x".into()))]);
        // v's value is optional, so the rest of the bundle is its value, not -D.
        assert_eq!(names(&["-vD/x"]), [("verbosity", Some("D/x".into()))]);
        assert_eq!(names(&["-lx"]), [("file-locks", None), ("ext-unix-sk", None)]);
        assert_eq!(names(&["-o/x"]), [("log-file", Some("/x".into()))]);
    }

    #[test]
    fn only_the_allowlist_passes() {
        for ok in [
            &["--tcp-close"][..],
            &["--tcp-c"],
            &["--ghost-limit", "4M"],
            &["--ghost-limit=1048576"],
            &["--network-lock", "skip"],
            &["--allow-uprobes", "-l", "--ext-unix-sk", "--skip-in-flight", "--link-remap", "--no-file-locks"],
        ] {
            assert_eq!(refused(ok), [], "{ok:?}");
        }
        for bad in [
            &["--action-scr=/x"][..],
            &["--lib=/x"],
            &["-L/x"],
            &["-D/x"],
            &["-o/x"],
            &["--tre=1"],
            &["--exec-cmd"],
            &["--root="],
            &["-vD/x"],
            &["-lD/x"],
            &["--ghost-limit", "--config=/x"],
            &["--ghost-limit", "1X"],
            &["--network-lock=iptables"],
            &["--ext-unix-sk=12"],
            &["--ghost-limit"],
            &["--tcp-close=1"],
            &["--help"],
            &["restore"],
        ] {
            assert!(!refused(bad).is_empty(), "{bad:?} passed");
        }
        let e = refused(&["--action-scr=/x"]).remove(0).to_string();
        assert!(e.contains("--action-script") && e.contains("runs a program as root"), "{e}");
    }

    #[test]
    fn config_files_become_argv_as_criu_makes_them() {
        let text =
            "# c\n  tcp-established\nnetwork-lock nftables  # why\n\nghost-limit\t4M\nx # y\nlink-remap \ntree=3";
        let w: Vec<String> = config_words(text).unwrap().into_iter().map(|(_, w)| w).collect();
        // A trailing blank makes an empty word, which CRIU skips unless an option takes it.
        assert_eq!(
            w,
            [
                "--tcp-established",
                "--network-lock",
                "nftables",
                "--ghost-limit",
                "4M",
                "--x",
                "--link-remap",
                "",
                "--tree=3"
            ]
        );
        assert_eq!(config_words("root \"/x\"\n").unwrap_err().0, 1);
        assert_eq!(config_words("a\nroot /x y\n").unwrap_err().0, 2);
        let problems = check_config_text("tcp-close\naction-script /tmp/x.sh\nlib /x\n");
        assert_eq!(problems.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [2, 3], "{problems:?}");
        // A value-taking option alone on its line takes the next line as its value.
        assert_eq!(check_config_text("ghost-limit\ntcp-close\n").len(), 1);
        for shipped in ["default.conf", "tcp-close.conf"] {
            let text =
                std::fs::read_to_string(format!("{}/criu-configs/{shipped}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            assert_eq!(check_config_text(&text), [], "{shipped}");
        }
    }

    /// The table is CRIU 4.2.1's, name for name and in order, when its source is at hand
    /// (scripts/setup builds CRIU from it).
    #[test]
    fn the_table_is_criu_4_2_1s() {
        let Ok(src) = std::fs::read_to_string("/var/cache/stasis-setup/build/criu-4.2.1/criu/config.c") else {
            eprintln!("CRIU 4.2.1's source is not here; the table was checked against it when written");
            return;
        };
        let macros = [
            ("USK_EXT_PARAM", "ext-unix-sk"),
            ("SK_EST_PARAM", "tcp-established"),
            ("LREMAP_PARAM", "link-remap"),
            ("OPT_SHELL_JOB", "shell-job"),
            ("OPT_FILE_LOCKS", "file-locks"),
            ("SK_INFLIGHT_PARAM", "skip-in-flight"),
            ("SK_CLOSE_PARAM", "tcp-close"),
            ("OPT_ALLOW_UPROBES", "allow-uprobes"),
        ];
        let table = src.split("long_opts[] = {").nth(1).unwrap().split("{},").next().unwrap();
        let mut names = Vec::new();
        for line in table.lines().map(str::trim) {
            let (bool_opt, rest) = match (line.strip_prefix("BOOL_OPT("), line.strip_prefix("{ ")) {
                (Some(r), _) => (true, r),
                (None, Some(r)) => (false, r),
                _ => continue,
            };
            let word = rest.split([',', ')']).next().unwrap().trim();
            let name = match word.strip_prefix('"') {
                Some(n) => n.trim_end_matches('"').to_string(),
                None => macros.iter().find(|(m, _)| *m == word).expect(word).1.to_string(),
            };
            if bool_opt {
                names.push(format!("no-{name}"));
                let at = names.len() - 1;
                names.insert(at, name);
            } else {
                names.push(name);
            }
        }
        let ours: Vec<&str> = LONG_OPTS.iter().map(|o| o.name).collect();
        assert_eq!(ours, names);
        assert!(src.contains("short_opts[] = \"dSsRt:hD:o:v::x::Vr:jJ:lW:L:M:\""));
    }

    proptest! {
        #[test]
        fn never_panics(list in prop::collection::vec("(?s).{0,12}|-[a-zA-Z]{1,4}.{0,4}|--[a-z-]{0,10}(=.{0,4})?", 0..6)) {
            let _ = check(&list, false);
            let _ = check_config_text(&list.join("\n"));
        }

        #[test]
        fn a_refused_option_is_refused_under_every_unambiguous_prefix(i in 0..LONG_OPTS.len(), value in "[/a-z0-9]{0,6}") {
            let o = &LONG_OPTS[i];
            prop_assume!(!ALLOWED.iter().any(|(n, _, _)| *n == o.name));
            for len in 1..=o.name.len() {
                let prefix = &o.name[..len];
                if resolve_long(prefix).map(|r| r.name) != Ok(o.name) {
                    continue;
                }
                for spelled in [vec![format!("--{prefix}")], vec![format!("--{prefix}={value}")], vec![format!("--{prefix}"), value.clone()]] {
                    prop_assert!(!check(&spelled, false).is_empty(), "{:?} passed", spelled);
                }
            }
        }
    }
}
