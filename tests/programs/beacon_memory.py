#!/usr/bin/python3
"""Holds MIB mebibytes of random bytes (drawn at the cold start) and answers GET / with a token
drawn at the start and their SHA-256: the same answer after a restore means the same memory.
Every 50 ms it also sends `TOKEN N` in a UDP datagram to 127.0.0.1:BEACON, so a test sees at
once whether a tree with that token runs (one whose restore was refused must never run).
Its arguments are ignored: a test puts its own directory there to know its processes."""
import hashlib
import os
import socket
import threading
import time

import json_http

memory = bytearray(os.urandom(int(os.environ["MIB"]) << 20))
token = os.urandom(8).hex()
beacon = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def beat():
    n = 0
    while True:
        n += 1
        try:
            beacon.sendto(f"{token} {n}".encode(), ("127.0.0.1", int(os.environ["BEACON"])))
        except OSError:
            pass
        time.sleep(0.05)


class Handler(json_http.Handler):
    def do_GET(self):
        self.reply(f"{token} {hashlib.sha256(memory).hexdigest()}")


threading.Thread(target=beat, daemon=True).start()
json_http.serve(int(os.environ["PORT"]), Handler)
