//! The kill port admits only a proven, allowed, live peer that says `stop` or nothing: a
//! client that connects and closes (or resets) at once, a TLS hello and any HTTP verb never stop
//! the service, whoever sends them; telnet's silence and `stop` still do.

use super::common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

fn started(env: &Env, name: &str, extra: &str) -> (u16, u16) {
    let [kill, http] = free_ports::<2>();
    env.write_service(name, &notes_yaml(kill, http, extra));
    env.start(name);
    wait_for("the service to answer", || http_json(http));
    (kill, http)
}

#[test]
fn connecting_and_closing_at_once_never_stops_a_service() {
    let env = Env::new();
    // nobody is allowed here, so only the doubt about a closed socket could let it through.
    let (kill, http) = started(&env, "closers", "");
    // Plain closes (FIN: the kernel keeps an orphan/time-wait entry with uid 0 and inode 0) and
    // resets (SO_LINGER 0: no entry at all), spaced so that many land after the accept.
    let code = format!(
        "import socket, struct, time\n\
         for i in range(300):\n\
         \x20   s = socket.create_connection(('127.0.0.1', {kill}))\n\
         \x20   if i % 2: s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
         \x20   s.close()\n\
         \x20   time.sleep(0.01)\n"
    );
    python_as("nobody", &code);
    // Root too: a closed connection asked for nothing.
    for _ in 0..20 {
        drop(TcpStream::connect(("127.0.0.1", kill)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(http_json(http).is_some(), "the service still runs");
    assert_eq!(committed_checkpoints(&env, "closers"), 0, "nothing was dumped");
    assert_eq!(env.status("closers")["state"], "running");

    // A flood of refusals is logged at a bounded rate: the service's log is its own.
    let refusals = env.log("closers").lines().filter(|l| l.contains("refused a kill-port connection")).count();
    assert!((1..=10).contains(&refusals), "{refusals} refusal lines for 320 connections");

    // And telnet's silence from the service user still stops it.
    let lines = python_as(
        "stasis-example",
        &format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {kill}))\nprint(s.makefile().read(), end='')"
        ),
    );
    assert!(lines.lines().last().is_some_and(|l| l.starts_with("OK checkpoint")), "{lines}");
    assert_eq!(committed_checkpoints(&env, "closers"), 1);
}

#[test]
fn tls_hellos_and_any_http_verb_are_refused_even_from_the_service_user() {
    let env = Env::new();
    let (kill, http) = started(&env, "browsed", "");
    let send = |payload: &str| {
        python_as(
            "stasis-example",
            &format!(
                "import socket\ns = socket.create_connection(('127.0.0.1', {kill}))\ns.sendall({payload})\nprint(s.makefile(errors='replace').read(), end='')"
            ),
        )
    };
    // A client paused for more than the 5 ms silence between its connect and its first bytes
    // (a loaded machine) is refused later, at post-dump, with the stop called off: as safe.
    let refused =
        |reply: &str, first: &str| reply.starts_with(first) || reply.starts_with("ERROR the stop was called off");
    // What `curl -k https://127.0.0.1:PORT/` sends first: a TLS record of type handshake.
    let tls = send("bytes([0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03]) + bytes(160)");
    assert!(refused(&tls, "refused: this is the kill port of browsed"), "{tls}");
    for request in [
        "b'PURGE / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'",
        "b'PROPFIND / HTTP/1.1\\r\\n\\r\\n'",
        "b'GET / HTTP/1.1\\r\\n\\r\\n'",
    ] {
        let reply = send(request);
        assert!(refused(&reply, "refused: this is the kill port of browsed"), "{request}: {reply}");
    }
    for other in ["b'\\xff\\xfd\\x18'", "b'\\r\\n'", "b'stop now\\n'", "b'STOP\\n'", "b'sto'"] {
        let reply = send(other);
        assert!(refused(&reply, "refused: the kill port of browsed takes only"), "{other}: {reply}");
    }
    assert!(http_json(http).is_some(), "the service still runs");
    assert_eq!(committed_checkpoints(&env, "browsed"), 0, "nothing was dumped");

    // The line telnet sends when the operator types `stop` works.
    let mut s = TcpStream::connect(("127.0.0.1", kill)).unwrap();
    s.write_all(b"stop\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.lines().last().is_some_and(|l| l.starts_with("OK checkpoint")), "{reply}");
}

#[test]
fn a_silent_client_that_leaves_before_its_stop_is_done_stops_nothing() {
    let env = Env::new();
    let (kill, http) = started(&env, "leaver", "");
    // Admitted for its silence (the announcement says the dump began), then gone: the stop is
    // asked again at post-dump, before the service ends, and called off.
    for left in 1..=3 {
        let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", kill)).unwrap());
        let mut first = String::new();
        s.read_line(&mut first).unwrap();
        assert!(first.starts_with("Saving checkpoint of leaver"), "{first}");
        drop(s);
        wait_for("the stop to be called off", || {
            (env.log("leaver").matches("closed the connection during the dump").count() == left).then_some(())
        });
        wait_for("the service to run again", || (env.status("leaver")["state"] == "running").then_some(()));
    }
    assert!(http_json(http).is_some(), "the service still runs");
    assert_eq!(committed_checkpoints(&env, "leaver"), 0);
    // A client that stays is the operator: it is answered in full.
    let lines: Vec<String> =
        BufReader::new(TcpStream::connect(("127.0.0.1", kill)).unwrap()).lines().map_while(Result::ok).collect();
    assert!(lines.last().is_some_and(|l| l.starts_with("OK checkpoint")), "{lines:?}");
}
