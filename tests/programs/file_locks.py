#!/usr/bin/python3
"""Holds three kinds of file lock in LOCK_DIR for as long as it runs: flock() on flock.lock, a
POSIX record lock (fcntl F_SETLK) on posix.lock, and an open file description lock (F_OFD_SETLK)
on ofd.lock. Serves the number of requests it has answered (in-memory state).

  GET / -> JSON: {"requests": n, "pid": ...}
"""
import fcntl
import os
import struct

import json_http

PORT = int(os.environ["PORT"])
DIR = os.environ["LOCK_DIR"]
F_OFD_SETLK = 37

held = []
for name in ("flock.lock", "posix.lock", "ofd.lock"):
    held.append(open(os.path.join(DIR, name), "a+"))
fcntl.flock(held[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
fcntl.lockf(held[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
fcntl.fcntl(held[2], F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
requests = 0


class Handler(json_http.Handler):
    def do_GET(self):
        global requests
        requests += 1
        self.reply({"requests": requests, "pid": os.getpid()})


print("file_locks: holding flock, POSIX and OFD locks", flush=True)
json_http.serve(PORT, Handler)
