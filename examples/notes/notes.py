#!/usr/bin/python3
"""A small stateful service for trying stasis: it keeps notes in memory only.

  GET  /        -> JSON: the notes, a request counter, pid, uid, and the heartbeat count
  POST /notes   -> appends the request body as a note

It also prints a numbered heartbeat line to stdout every HEARTBEAT_SECS (default 0.1 s), so
`stasis logs notes` shows whether any output line was lost or doubled across checkpoints.
Nothing is ever written to disk: whatever survives a stop/start survived in a checkpoint.
"""
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

PORT = int(os.environ.get("NOTES_PORT", "8420"))
HEARTBEAT_SECS = float(os.environ.get("HEARTBEAT_SECS", "0.1"))

state = {"notes": [], "requests": 0, "heartbeats": 0, "cold_started_at": time.time()}
lock = threading.Lock()


def heartbeat():
    while True:
        with lock:
            state["heartbeats"] += 1
            n = state["heartbeats"]
        print(f"heartbeat {n}", flush=True)
        time.sleep(HEARTBEAT_SECS)


class Handler(BaseHTTPRequestHandler):
    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            state["requests"] += 1
            body = dict(state, pid=os.getpid(), uid=os.getuid())
        self._reply(200, body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        note = self.rfile.read(length).decode(errors="replace")
        with lock:
            state["requests"] += 1
            state["notes"].append(note)
            count = len(state["notes"])
        self._reply(200, {"notes": count})

    def log_message(self, fmt, *args):
        pass


if __name__ == "__main__":
    threading.Thread(target=heartbeat, daemon=True).start()
    server = HTTPServer(("127.0.0.1", PORT), Handler)
    print(f"notes: listening on 127.0.0.1:{PORT} as uid {os.getuid()}", flush=True)
    server.serve_forever()
