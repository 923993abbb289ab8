#!/usr/bin/python3
"""Two processes sharing a POSIX shared memory segment (shm_open: a file in /dev/shm).

The parent creates SHM_NAME, writes a text into it and serves it over HTTP; a forked child maps
the same segment and increments a counter in it every 50 ms. So the parent sees the counter move
only while both processes share the segment.

  GET  /      -> JSON: {"text": ..., "counter": ..., "child_alive": ...}
  POST /text  -> the request body becomes the text (written into the segment)
"""
import _posixshmem
import mmap
import os
import struct
import time

import json_http

PORT = int(os.environ["PORT"])
NAME = "/" + os.environ["SHM_NAME"]
SIZE = 4096

fd = _posixshmem.shm_open(NAME, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
os.ftruncate(fd, SIZE)
shm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)


def set_text(text):
    data = text.encode()[: SIZE - 16]
    shm[8:12] = struct.pack("I", len(data))
    shm[16 : 16 + len(data)] = data


def get_text():
    (n,) = struct.unpack("I", shm[8:12])
    return shm[16 : 16 + n].decode()


set_text("written at the cold start")

child = os.fork()
if child == 0:
    # The child: its own mapping of the same segment (a fresh open, not the inherited map).
    fd = _posixshmem.shm_open(NAME, os.O_RDWR, 0)
    mine = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    while True:
        (c,) = struct.unpack("Q", mine[0:8])
        mine[0:8] = struct.pack("Q", c + 1)
        time.sleep(0.05)


class Handler(json_http.Handler):
    def do_GET(self):
        alive = os.waitpid(child, os.WNOHANG) == (0, 0)
        self.reply({"text": get_text(), "counter": struct.unpack("Q", shm[0:8])[0], "child_alive": alive})

    def do_POST(self):
        set_text(self.body())
        self.reply({"text": get_text()})


print(f"posix_shm: {NAME} shared with child {child}", flush=True)
json_http.serve(PORT, Handler)
