#!/usr/bin/python3
"""Keeps using kernel objects that live only in its open file descriptors:

- an eventfd whose count is set by requests (never read by anyone else);
- a memfd holding a text, read back through a shared mapping of it;
- a timerfd ticking every 50 ms, read by a thread that adds up the expirations;
- a signalfd for SIGUSR1 (blocked), read by a thread that counts the signals; and a second
  signalfd for SIGUSR2 that nobody reads until asked, so a SIGUSR2 can stay pending;
- an inotify watch on WATCH_DIR (IN_CREATE), read by a thread that records the names created.

  GET  /                -> JSON with all of the above
  POST /eventfd         -> adds the body (a number) to the eventfd's count
  POST /memfd           -> the body becomes the memfd's text
  POST /signal          -> sends itself SIGUSR1 (counted by the signalfd thread)
  POST /queue           -> sends itself SIGUSR2 (stays pending in the second signalfd)
  POST /drain           -> reads the second signalfd: how many SIGUSR2 were pending
"""
import ctypes
import mmap
import os
import signal
import struct
import threading

import json_http

PORT = int(os.environ["PORT"])
WATCH_DIR = os.environ["WATCH_DIR"]
CLOCK_MONOTONIC, IN_CREATE = 1, 0x100
MEMFD_SIZE = 4096

libc = ctypes.CDLL(None, use_errno=True)


def check(r):
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


# Signals first, before any thread exists: every thread inherits the blocked mask.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGUSR2})


def signalfd(sig, flags=0):
    mask = ctypes.create_string_buffer(128)  # sigset_t
    libc.sigemptyset(mask)
    libc.sigaddset(mask, sig)
    return check(libc.signalfd(-1, mask, flags))


usr1_fd = signalfd(signal.SIGUSR1)
usr2_fd = signalfd(signal.SIGUSR2, os.O_NONBLOCK)

efd = os.eventfd(0, os.EFD_NONBLOCK)

mfd = os.memfd_create("stasis-state")
os.ftruncate(mfd, MEMFD_SIZE)
mem = mmap.mmap(mfd, MEMFD_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def memfd_write(text):
    data = text.encode()[: MEMFD_SIZE - 4]
    os.pwrite(mfd, struct.pack("I", len(data)) + data, 0)


def memfd_read():
    (n,) = struct.unpack("I", mem[0:4])
    return mem[4 : 4 + n].decode()


memfd_write("written at the cold start")


class Itimerspec(ctypes.Structure):
    _fields_ = [("i_sec", ctypes.c_long), ("i_nsec", ctypes.c_long), ("v_sec", ctypes.c_long), ("v_nsec", ctypes.c_long)]


tfd = check(libc.timerfd_create(CLOCK_MONOTONIC, 0))
check(libc.timerfd_settime(tfd, 0, ctypes.byref(Itimerspec(0, 50_000_000, 0, 50_000_000)), None))

ifd = check(libc.inotify_init1(0))
check(libc.inotify_add_watch(ifd, WATCH_DIR.encode(), IN_CREATE))

state = {"ticks": 0, "usr1": 0, "created": []}
lock = threading.Lock()


def timer_loop():
    while True:
        (n,) = struct.unpack("Q", os.read(tfd, 8))
        with lock:
            state["ticks"] += n


def usr1_loop():
    while True:
        os.read(usr1_fd, 128)  # one struct signalfd_siginfo
        with lock:
            state["usr1"] += 1


def inotify_loop():
    while True:
        buf = os.read(ifd, 4096)
        i = 0
        while i < len(buf):
            _wd, _mask, _cookie, length = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16 : i + 16 + length].rstrip(b"\0").decode()
            i += 16 + length
            with lock:
                state["created"].append(name)


def eventfd_peek():
    try:
        n = os.eventfd_read(efd)
    except BlockingIOError:
        return 0
    os.eventfd_write(efd, n)
    return n


class Handler(json_http.Handler):
    def do_GET(self):
        with lock:
            body = dict(state, created=list(state["created"]))
        body.update(eventfd=eventfd_peek(), memfd=memfd_read(), pid=os.getpid())
        self.reply(body)

    def do_POST(self):
        arg = self.body()
        reply = {}
        if self.path == "/eventfd":
            os.eventfd_write(efd, int(arg))
        elif self.path == "/memfd":
            memfd_write(arg)
        elif self.path == "/signal":
            os.kill(os.getpid(), signal.SIGUSR1)
        elif self.path == "/queue":
            os.kill(os.getpid(), signal.SIGUSR2)
        elif self.path == "/drain":
            n = 0
            try:
                while os.read(usr2_fd, 128):
                    n += 1
            except BlockingIOError:
                pass
            reply["drained"] = n
        self.reply(reply)


for loop in (timer_loop, usr1_loop, inotify_loop):
    threading.Thread(target=loop, daemon=True).start()
print("fd_kinds: eventfd, memfd, timerfd, signalfd, inotify ready", flush=True)
json_http.serve(PORT, Handler)
