//! The seed's own system: an SBCL image with a Swank listener (Debian's sbcl and cl-swank),
//! run as a service user, keeps its in-memory state across stop -> start, and Swank answers
//! after the restore.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Evaluates `expr` through Swank's wire protocol (6 hex digits of length, then an s-expression)
/// and returns the printed value.
fn swank_eval(port: u16, expr: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let quoted = expr.replace('\\', "\\\\").replace('"', "\\\"");
    let msg = format!("(:emacs-rex (swank:eval-and-grab-output \"{quoted}\") \"COMMON-LISP-USER\" t 1)");
    s.write_all(format!("{:06x}{msg}", msg.len()).as_bytes()).ok()?;
    loop {
        let mut len = [0u8; 6];
        s.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; usize::from_str_radix(std::str::from_utf8(&len).ok()?, 16).ok()?];
        s.read_exact(&mut body).ok()?;
        let reply = String::from_utf8(body).ok()?;
        // Other messages (:indentation-update, ...) may come first.
        if let Some(rest) = reply.strip_prefix("(:return (:ok (\"") {
            // (:return (:ok ("OUTPUT" "VALUE")) 1): the value is the second string.
            let value = rest.rsplit_once("\")) 1)")?.0;
            return Some(value.rsplit_once(" \"")?.1.replace("\\\"", "\""));
        }
        if reply.starts_with("(:return") {
            return None;
        }
    }
}

#[test]
fn an_sbcl_image_with_swank_keeps_its_memory_across_stop_and_start() {
    let env = Env::new();
    let [kill, swank] = free_ports::<2>();
    let work = env.path().join("lisp-work");
    std::fs::create_dir(&work).unwrap();
    nix::unistd::chown(&work, Some(nix::unistd::Uid::from_raw(uid_of_user("stasis-example"))), None).unwrap();
    env.write_service(
        "lisp",
        &format!(
            "command: [\"/usr/bin/sbcl\", \"--noinform\", \"--no-sysinit\", \"--no-userinit\", \"--non-interactive\", \"--load\", \"{REPO}/examples/sbcl-swank/start-swank.lisp\"]\nuser: stasis-example\nkill_port: {kill}\nworking_dir: {w}\nenvironment:\n  SWANK_PORT: \"{swank}\"\n  XDG_CACHE_HOME: {w}/cache\n",
            w = work.display()
        ),
    );
    assert_eq!(env.start("lisp")["started_from"], "cold");
    // The first start compiles Swank; wait for it to answer.
    assert_eq!(wait_for("swank to answer", || swank_eval(swank, "(+ 1 2)")), "3");
    let filled = swank_eval(
        swank,
        "(progn (dotimes (i 200000) (setf (gethash i *notes*) (* i i))) (setf (gethash \"greeting\" *notes*) \"hello from before the checkpoint\") (hash-table-count *notes*))",
    );
    assert_eq!(filled.as_deref(), Some("200001"));
    let started_at = swank_eval(swank, "*started-at*").unwrap();
    let pid = env.status("lisp")["pid"].as_i64().unwrap();
    assert_eq!(uid_of(pid), uid_of_user("stasis-example"), "the image runs as its service user");

    let lines = kill_port(kill);
    assert!(lines.last().unwrap().starts_with("OK checkpoint"), "{lines:?}");
    assert!(swank_eval(swank, "(+ 1 2)").is_none(), "the image is gone after the kill port");

    assert_eq!(env.start("lisp")["started_from"], "checkpoint");
    let answer = wait_for("swank to answer after the restore", || swank_eval(swank, "(hash-table-count *notes*)"));
    assert_eq!(answer, "200001", "the hash table survived");
    assert_eq!(swank_eval(swank, "(values (gethash 4321 *notes*))").as_deref(), Some("18671041"));
    assert_eq!(
        swank_eval(swank, "(values (gethash \"greeting\" *notes*))").as_deref(),
        Some("\"hello from before the checkpoint\"")
    );
    assert_eq!(swank_eval(swank, "*started-at*").unwrap(), started_at, "the same image, not a new one");
    let pid = env.status("lisp")["pid"].as_i64().unwrap();
    assert_eq!(uid_of(pid), uid_of_user("stasis-example"));
    env.ok(&["stop", "lisp"]);
}
