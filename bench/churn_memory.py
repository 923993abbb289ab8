#!/usr/bin/python3
"""The service of bench/incremental: holds MIB mebibytes of written private anonymous memory
and answers over HTTP: GET / with `ok`; GET /churn/PERMILLE rewrites that share of its memory
(a different part each time) and answers how many pages it wrote: as whole 2 MiB blocks
spread over the memory (default), or with SCATTER=1 one byte in every (1000 / PERMILLE)-th
page, the same count of pages spread as thinly as can be (with transparent huge pages, each
write then makes a whole 2 MiB huge page dirty). GET /hot/PERMILLE starts a thread that keeps
rewriting the same share (its first blocks) every 50 ms: a service that keeps writing its hot
data while it is stopped. NO_THP=1 keeps transparent huge pages off its memory
(MADV_NOHUGEPAGE)."""
import mmap
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

PAGE = 4096
mib = int(os.environ["MIB"])
pages = mib << 8
memory = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if os.environ.get("NO_THP") == "1":
    # Before the first touch: no huge page backs it, so the kernel tracks each 4 KiB page.
    memory.madvise(mmap.MADV_NOHUGEPAGE)
block = os.urandom(1 << 20)
for i in range(mib):
    memory[i << 20:(i + 1) << 20] = block
rounds = 0
BLOCK = 2 << 20
blocks = pages * PAGE // BLOCK


# Made once: a 2 MiB object allocated at each churn would be mmapped by malloc at first, next to
# the big region, and a new mapping merged into it makes the kernel mark all of it soft-dirty
# (VM_SOFTDIRTY): the next incremental dump would hold everything.
patterns = [os.urandom(64) * (BLOCK // 64) for _ in range(4)]


def rewrite(b):
    global rounds
    memory[b * BLOCK:(b + 1) * BLOCK] = patterns[(rounds + b) % len(patterns)]


def share(permille):
    return max(1, blocks * permille // 1000)


def hot(permille):
    while True:
        for b in range(share(permille)):
            rewrite(b)
        time.sleep(0.05)


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
        if parts[0] == "hot":
            threading.Thread(target=hot, args=(int(parts[1]),), daemon=True).start()
            self.reply("ok")
            return
        if parts[0] != "churn":
            self.reply("ok")
            return
        permille = int(parts[1])
        rounds += 1
        written = 0
        if os.environ.get("SCATTER") == "1":
            step = 1000 // permille
            for n in range(rounds % step, pages, step):
                memory[n * PAGE] = (memory[n * PAGE] + 1) % 256
                written += 1
        else:
            k = share(permille)
            for j in range(k):
                rewrite((rounds * 7919 + j * (blocks // k)) % blocks)
                written += BLOCK // PAGE
        self.reply(str(written))


HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
