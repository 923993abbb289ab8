#!/usr/bin/python3
"""Holds MIB mebibytes of private anonymous memory, every page filled with a pattern of its own:
its number, its version (how often it was rewritten) and a token drawn at the cold start. Over
HTTP: GET /check answers `ok PAGES DIGEST` once every page holds the pattern of its version
(DIGEST: a hash of every page's version, so a test can tell which moment the memory is from),
else `bad N FIRST`; GET /write/FIRST/COUNT rewrites COUNT pages from page FIRST with their next
version and answers the new digest. With WRITER=1 a thread keeps rewriting random pages of its
first sixteenth (a service that keeps writing its hot data while it is dumped); the versions and the pages change under one
lock, so at any freeze they agree once the thread has finished its page. Its arguments are
ignored: a test puts its own directory there to know its processes."""
import hashlib
import mmap
import os
import random
import threading
import time

import json_http

PAGE = 4096
pages = int(os.environ["MIB"]) << 8
token = os.urandom(8)
memory = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
versions = bytearray(pages)
lock = threading.Lock()


def pattern(n, v):
    return (n.to_bytes(6, "little") + v.to_bytes(2, "little") + token) * (PAGE // 16)


for n in range(pages):
    memory[n * PAGE:(n + 1) * PAGE] = pattern(n, 0)


def write(n):
    versions[n] = (versions[n] + 1) % 256
    memory[n * PAGE:(n + 1) * PAGE] = pattern(n, versions[n])


def digest():
    return hashlib.sha256(bytes(versions)).hexdigest()[:16]


def check():
    with lock:
        bad, first = 0, None
        for n in range(pages):
            if memory[n * PAGE:(n + 1) * PAGE] != pattern(n, versions[n]):
                bad += 1
                first = n if first is None else first
        return f"ok {pages} {digest()}" if bad == 0 else f"bad {bad} {first}"


def writer():
    hot = max(1, pages // 16)
    while True:
        with lock:
            for _ in range(8):
                write(random.randrange(hot))
        time.sleep(0.005)


class Handler(json_http.Handler):
    def do_GET(self):
        parts = self.path.strip("/").split("/")
        if parts[0] == "write":
            first, count = int(parts[1]), int(parts[2])
            with lock:
                for n in range(first, min(first + count, pages)):
                    write(n)
                self.reply(digest())
        else:
            self.reply(check())


if os.environ.get("WRITER") == "1":
    threading.Thread(target=writer, daemon=True).start()
json_http.serve(int(os.environ["PORT"]), Handler)
