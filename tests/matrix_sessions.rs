//! Compatibility matrix, sessions: programs whose clients hold a connection or a session open
//! across `stasis stop` + `stasis start`, with the plain service file (the defaults in
//! criu-configs/: tcp-established and the nftables network lock).
//!
//! Ports: kill ports 7121-7139, service ports 6121-6139.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One line-protocol client that keeps its socket for the whole test.
struct LineClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineClient {
    fn connect(port: u16) -> Option<LineClient> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        Some(LineClient { reader: BufReader::new(s.try_clone().ok()?), writer: s })
    }

    fn send(&mut self, line: &str) {
        self.writer.write_all(format!("{line}\n").as_bytes()).expect("send a line on the kept connection");
    }

    fn recv(&mut self) -> String {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("read a reply on the kept connection");
        assert!(n > 0, "the server closed the connection");
        l.trim_end().to_string()
    }

    fn ask(&mut self, line: &str) -> String {
        self.send(line);
        self.recv()
    }

    fn local_port(&self) -> u16 {
        self.writer.local_addr().unwrap().port()
    }
}

fn asyncio_yaml(kill_port: u16, port: u16) -> String {
    format!(
        "command: [\"/usr/bin/python3\", \"{REPO}/tests/programs/asyncio_counter.py\"]\nuser: stasis-example\nkill_port: {kill_port}\nenvironment:\n  ASYNCIO_PORT: \"{port}\"\n"
    )
}

#[test]
fn asyncio_server_keeps_its_established_client_connections_and_their_state() {
    let env = Env::new();
    env.write_service("aio", &asyncio_yaml(7121, 6121));
    let first = env.start("aio");
    assert_eq!(first["started_from"], "cold", "{first}");
    let mut a = wait_for("the asyncio server", || LineClient::connect(6121));
    let mut b = LineClient::connect(6121).expect("a second client");
    assert_eq!(a.ask("add 5"), "conn=1 lines=1 sum=5 total=5 conns=2");
    assert_eq!(b.ask("add 7"), "conn=2 lines=1 sum=7 total=12 conns=2");
    assert_eq!(a.ask("add 1"), "conn=1 lines=2 sum=6 total=13 conns=2");
    let (port_a, port_b) = (a.local_port(), b.local_port());

    let t = Instant::now();
    env.ok(&["stop", "aio"]);
    let stopped = t.elapsed();
    let t = Instant::now();
    let back = env.start("aio");
    let started = t.elapsed();
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    eprintln!("stop {stopped:?}, start {started:?}");

    // The same sockets (not reconnected) go on, and the server still knows them.
    assert_eq!((a.local_port(), b.local_port()), (port_a, port_b));
    let t = Instant::now();
    assert_eq!(b.ask("add 10"), "conn=2 lines=2 sum=17 total=23 conns=2", "b's connection and the total continue");
    eprintln!("first reply after the restore {:?}", t.elapsed());
    assert_eq!(a.ask("state"), "conn=1 lines=2 sum=6 total=23 conns=2", "a's connection continues");
    // A new client is the third the server ever accepted: its counter came back too.
    let mut c = LineClient::connect(6121).expect("a new client after the restore");
    assert_eq!(c.ask("add 2"), "conn=3 lines=1 sum=2 total=25 conns=3");
    drop(c);

    // A second cycle, with a line sent while the service is stopped: the network lock holds
    // it (no reset), TCP retransmits it and the restored server answers.
    env.ok(&["stop", "aio"]);
    a.send("add 100");
    let back = env.start("aio");
    assert_eq!(back["started_from"], "checkpoint", "{back}");
    let t = Instant::now();
    assert_eq!(a.recv(), "conn=1 lines=3 sum=106 total=125 conns=2", "the line sent during the stop arrived once");
    eprintln!("reply to the line sent while stopped: {:?} after the start", t.elapsed());
    assert_eq!(b.ask("state"), "conn=2 lines=2 sum=17 total=125 conns=2");
    env.ok(&["stop", "aio"]);
}
