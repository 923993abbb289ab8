#!/usr/bin/env python3
"""Helper of bench/soak: a Redis writer, a verifier and the report, in plain Python 3 (no
packages; RESP spoken over a socket).

  soak_client.py write  --port P --record FILE --stats FILE [--rate R] [--timeout S]
      Writes SET soak:<seq> <seq> on one persistent connection, seq = 1, 2, 3, ... Every
      seq answered with +OK is appended to FILE (one per line, flushed at once). A write that
      gets no reply within the timeout, an error reply or any socket error is not
      acknowledged: the connection is dropped and a new one is made (seq is never reused).
      SIGTERM/SIGINT: finish the write in flight, write the stats JSON to --stats, exit 0.

  soak_client.py verify --port P --record FILE
      Reads every acknowledged key back (MGET in batches) and prints JSON with the counts
      of missing and wrong values.

  soak_client.py report --timings TSV --client JSON --verify JSON [--meta JSON] [--json]
      Prints the human summary (stdout, or stderr with --json) and, with --json, one JSON
      object on stdout. Exits 1 if a cycle failed or an acknowledged write was lost.
"""

import argparse
import json
import math
import signal
import socket
import statistics
import sys
import time


class RespError(Exception):
    pass


class Conn:
    """One RESP connection with a read buffer."""

    def __init__(self, host, port, timeout):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2 :]
                return line
            self._fill()

    def _exact(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionError("unexpected reply %r" % line[:40])


def cmd_write(a):
    stop = False

    def on_signal(_sig, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    stats = {"sent": 0, "acked": 0, "unacked": 0, "timeouts": 0, "errors": 0, "error_replies": 0,
             "connects": 0, "connect_failures": 0, "last_error": None, "max_gap_ms": 0.0}
    interval = 1.0 / a.rate if a.rate > 0 else 0.0
    seq = 0
    conn = None
    last_ack = None
    next_t = time.monotonic()
    with open(a.record, "a", buffering=1) as rec:
        while not stop:
            if conn is None:
                try:
                    conn = Conn(a.host, a.port, a.timeout)
                    stats["connects"] += 1
                except OSError as e:
                    stats["connect_failures"] += 1
                    stats["last_error"] = "connect: %s" % e
                    time.sleep(0.02)
                    continue
            seq += 1
            stats["sent"] += 1
            try:
                conn.send(b"SET", b"soak:%d" % seq, b"%d" % seq)
                r = conn.reply()
            except socket.timeout:
                stats["timeouts"] += 1
                stats["unacked"] += 1
                stats["last_error"] = "seq %d: no reply within %.2f s" % (seq, a.timeout)
                conn.close()
                conn = None
                continue
            except RespError as e:
                stats["error_replies"] += 1
                stats["unacked"] += 1
                stats["last_error"] = "seq %d: error reply: %s" % (seq, e)
                conn.close()
                conn = None
                time.sleep(0.02)
                continue
            except (OSError, ConnectionError, ValueError) as e:
                stats["errors"] += 1
                stats["unacked"] += 1
                stats["last_error"] = "seq %d: %s" % (seq, e)
                conn.close()
                conn = None
                time.sleep(0.02)
                continue
            if r == b"OK":
                rec.write("%d\n" % seq)
                stats["acked"] += 1
                now = time.monotonic()
                if last_ack is not None:
                    stats["max_gap_ms"] = max(stats["max_gap_ms"], (now - last_ack) * 1000.0)
                last_ack = now
            else:
                stats["unacked"] += 1
                stats["last_error"] = "seq %d: unexpected reply %r" % (seq, r)
                conn.close()
                conn = None
                continue
            if interval:
                next_t += interval
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -1.0:
                    next_t = time.monotonic()  # after an outage, don't burst to catch up
    if conn is not None:
        conn.close()
    stats["last_seq"] = seq
    stats["max_gap_ms"] = round(stats["max_gap_ms"], 1)
    with open(a.stats, "w") as f:
        json.dump(stats, f)
    return 0


def read_record(path):
    seqs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                seqs.append(int(line))
    return seqs


def cmd_verify(a):
    seqs = read_record(a.record)
    conn = Conn(a.host, a.port, a.timeout)
    missing, wrong, examples = 0, 0, []
    for i in range(0, len(seqs), a.batch):
        batch = seqs[i : i + a.batch]
        conn.send(b"MGET", *[b"soak:%d" % s for s in batch])
        values = conn.reply()
        if not isinstance(values, list) or len(values) != len(batch):
            raise SystemExit("verify: unexpected MGET reply for %d keys" % len(batch))
        for s, v in zip(batch, values):
            if v is None:
                missing += 1
                if len(examples) < 10:
                    examples.append("soak:%d missing" % s)
            elif v != b"%d" % s:
                wrong += 1
                if len(examples) < 10:
                    examples.append("soak:%d = %r" % (s, v[:40]))
    conn.send(b"DBSIZE")
    dbsize = conn.reply()
    conn.close()
    json.dump({"checked": len(seqs), "distinct": len(set(seqs)), "missing": missing, "wrong": wrong,
               "lost": missing + wrong, "examples": examples, "dbsize": dbsize}, sys.stdout)
    print()
    return 0


def pct(values, p):
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    return v[max(0, math.ceil(p / 100.0 * len(v)) - 1)]


def summary(values):
    if not values:
        return {"median": None, "p90": None, "min": None, "max": None, "n": 0}
    r = lambda x: round(x, 1)
    return {"median": r(statistics.median(values)), "p90": r(pct(values, 90)), "min": r(min(values)),
            "max": r(max(values)), "n": len(values)}


def cmd_report(a):
    meta = json.loads(a.meta) if a.meta else {}
    rows = []
    with open(a.timings) as f:
        for line in f:
            if not line.strip() or line.startswith("#"):
                continue
            p = line.rstrip("\n").split("\t")
            rows.append({"cycle": int(p[0]), "stop_rc": int(p[1]), "stop_us": int(p[2]), "start_rc": int(p[3]),
                         "start_us": int(p[4]), "started_from": p[5], "ok": p[6] == "1", "reason": p[7] if len(p) > 7 else ""})
    client = json.load(open(a.client)) if a.client else {}
    verify = json.load(open(a.verify)) if a.verify else {}
    stop_ms = [r["stop_us"] / 1000.0 for r in rows if r["stop_rc"] == 0]
    start_ms = [r["start_us"] / 1000.0 for r in rows if r["start_rc"] == 0 and r["started_from"] == "checkpoint"]
    failed = [r for r in rows if not r["ok"]]
    lost = verify.get("lost")
    result = {
        "cycles": len(rows),
        "cycles_requested": meta.get("cycles_requested"),
        "failed_cycles": len(failed),
        "acknowledged_writes": verify.get("checked"),
        "lost_writes": lost,
        "lost_missing": verify.get("missing"),
        "lost_wrong_value": verify.get("wrong"),
        "duration_s": meta.get("duration_s"),
        "stop_ms": summary(stop_ms),
        "start_ms": summary(start_ms),
        "writes_sent": client.get("sent"),
        "writes_unacknowledged": client.get("unacked"),
        "client_timeouts": client.get("timeouts"),
        "client_errors": (client.get("errors") or 0) + (client.get("error_replies") or 0) if client else None,
        "client_connections": client.get("connects"),
        "client_max_gap_ms": client.get("max_gap_ms"),
        "keys_in_redis": verify.get("dbsize"),
        "stalled_cycles": meta.get("stalled_cycles"),
        "cold_restarts": meta.get("cold_restarts"),
        "failures": [{"cycle": r["cycle"], "reason": r["reason"]} for r in failed][:50],
        "lost_examples": verify.get("examples", []),
    }
    for k in ("started", "host", "kernel", "nproc", "criu", "stasis_binary", "rate", "timeout_s", "dwell_s",
              "cmd_timeout_s", "nft_criu_tables_before", "nft_criu_tables_after", "leftover_processes",
              "nft_criu_tables_new_not_ours", "leftover_listeners", "leftover_nft_tables"):
        if k in meta:
            result[k] = meta[k]
    result["aborted"] = meta.get("aborted") or None
    passed = result["failed_cycles"] == 0 and lost == 0 and not result["aborted"]
    result["passed"] = passed

    out = sys.stderr if a.json else sys.stdout
    q = lambda v: "?" if v is None else v
    fmt = lambda s: "-" if s["median"] is None else "median %.1f ms, p90 %.1f ms (min %.1f, max %.1f, n=%d)" % (
        s["median"], s["p90"], s["min"], s["max"], s["n"])
    print("soak result: %s" % ("PASS" if passed else "FAIL"), file=out)
    print("  cycles:              %d of %s (failed %d)" % (result["cycles"], result["cycles_requested"], len(failed)), file=out)
    print("  acknowledged writes: %s (lost %s: %s missing, %s wrong value)" % (
        q(result["acknowledged_writes"]), q(lost), q(result["lost_missing"]), q(result["lost_wrong_value"])), file=out)
    print("  writes sent:         %s (%s unacknowledged, %s timeouts, %s connections; longest gap between acks %s ms)" % (
        q(result["writes_sent"]), q(result["writes_unacknowledged"]), q(result["client_timeouts"]),
        q(result["client_connections"]), q(result["client_max_gap_ms"])), file=out)
    print("  duration:            %s s" % q(result["duration_s"]), file=out)
    print("  stop:                %s" % fmt(result["stop_ms"]), file=out)
    print("  start (restore):     %s" % fmt(result["start_ms"]), file=out)
    if result["aborted"]:
        print("  aborted:             %s" % result["aborted"], file=out)
    if result.get("stalled_cycles"):
        print("  stalled cycles:      %s (no acknowledged write within the dwell limit after a start)" % result["stalled_cycles"], file=out)
    if result.get("cold_restarts"):
        print("  cold restarts:       %s (recovery after failed cycles)" % result["cold_restarts"], file=out)
    for f in result["failures"][:20]:
        print("  failed cycle %d: %s" % (f["cycle"], f["reason"]), file=out)
    for e in result["lost_examples"]:
        print("  lost: %s" % e, file=out)
    if a.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0 if passed else 1


def main():
    ap = argparse.ArgumentParser(description="bench/soak helper: Redis writer, verifier, report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    v = sub.add_parser("verify")
    for p in (w, v):
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--record", required=True)
    w.add_argument("--stats", required=True)
    w.add_argument("--rate", type=float, default=1000.0, help="writes per second at most (0: unthrottled)")
    w.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for a connect or a reply")
    v.add_argument("--timeout", type=float, default=30.0)
    v.add_argument("--batch", type=int, default=1000)
    r = sub.add_parser("report")
    r.add_argument("--timings", required=True)
    r.add_argument("--client")
    r.add_argument("--verify")
    r.add_argument("--meta")
    r.add_argument("--json", action="store_true")
    a = ap.parse_args()
    return {"write": cmd_write, "verify": cmd_verify, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
