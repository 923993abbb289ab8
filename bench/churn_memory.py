#!/usr/bin/python3
"""The service of bench/incremental: holds MIB mebibytes of written private anonymous memory
and answers over HTTP: GET / with `ok`; GET /churn/PERMILLE rewrites one byte in PERMILLE of
every thousand of its pages (a different set each time), so that exactly that share of its
memory changed since the last checkpoint, and answers how many pages it wrote."""
import mmap
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

PAGE = 4096
mib = int(os.environ["MIB"])
pages = mib << 8
memory = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
block = os.urandom(1 << 20)
for i in range(mib):
    memory[i << 20:(i + 1) << 20] = block
rounds = 0


class Handler(BaseHTTPRequestHandler):
    def reply(self, text):
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass

    def do_GET(self):
        global rounds
        parts = self.path.strip("/").split("/")
        if parts[0] != "churn":
            self.reply("ok")
            return
        step = 1000 // int(parts[1])
        rounds += 1
        written = 0
        for n in range(rounds % step, pages, step):
            memory[n * PAGE] = (memory[n * PAGE] + 1) % 256
            written += 1
        self.reply(str(written))


HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
