#!/usr/bin/python3
"""Holds MIB mebibytes of private anonymous memory, every page filled with a pattern of its own
(its number and a token drawn at the cold start, never zero), and answers over HTTP:
GET / with the token at once, without touching that memory (how soon a restored service
answers); GET /check with `ok PAGES` once every page holds its pattern, else `bad N FIRST` (how
many pages differ, the first of them). With TOUCH=1 a thread reads pages all over the memory
all the time, so a lazy restore meets faults while it pushes the rest, and checks each: a page
that is not its pattern is reported at once, as `bad PAGE` in a UDP datagram to
127.0.0.1:BEACON, before anything could kill the process. Its arguments are
ignored: a test puts its own directory there to know its processes."""
import mmap
import os
import random
import socket
import threading

import json_http

PAGE = 4096
pages = int(os.environ["MIB"]) << 8
token = os.urandom(8)
memory = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def pattern(n):
    return (n.to_bytes(8, "little") + token) * (PAGE // 16)


for n in range(pages):
    memory[n * PAGE:(n + 1) * PAGE] = pattern(n)


def check():
    bad, first = 0, None
    for n in range(pages):
        if memory[n * PAGE:(n + 1) * PAGE] != pattern(n):
            bad += 1
            first = n if first is None else first
    return f"ok {pages}" if bad == 0 else f"bad {bad} {first}"


def touch():
    beacon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    while True:
        n = random.randrange(pages)
        if memory[n * PAGE:n * PAGE + 16] != n.to_bytes(8, "little") + token:
            beacon.sendto(f"bad {n}".encode(), ("127.0.0.1", int(os.environ["BEACON"])))


class Handler(json_http.Handler):
    def do_GET(self):
        self.reply(check() if self.path == "/check" else token.hex())


if os.environ.get("TOUCH") == "1":
    threading.Thread(target=touch, daemon=True).start()
json_http.serve(int(os.environ["PORT"]), Handler)
