#!/usr/bin/python3
"""Two processes sharing a SysV shared memory segment, guarded by a SysV semaphore (shmget,
shmat, semget, semop through ctypes). The parent keeps a text in the segment and serves it; a
forked child increments a counter in it every 50 ms, each time under the semaphore (P then V).

  GET  /      -> JSON: {"text", "counter", "sem", "shmid", "semid"}
  POST /text  -> the request body becomes the text (written under the semaphore)
"""
import ctypes
import os
import struct
import time

import json_http

PORT = int(os.environ["PORT"])
IPC_PRIVATE, IPC_CREAT, SETVAL, GETVAL = 0, 0o1000, 16, 12
SIZE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]


class Sembuf(ctypes.Structure):
    _fields_ = [("sem_num", ctypes.c_ushort), ("sem_op", ctypes.c_short), ("sem_flg", ctypes.c_short)]


def check(r):
    if r == -1 or r is None:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


shmid = check(libc.shmget(IPC_PRIVATE, SIZE, IPC_CREAT | 0o600))
semid = check(libc.semget(IPC_PRIVATE, 1, IPC_CREAT | 0o600))
check(libc.semctl(semid, 0, SETVAL, ctypes.c_int(1)))
addr = check(libc.shmat(shmid, None, 0))
seg = (ctypes.c_char * SIZE).from_address(addr)


def op(n):
    b = Sembuf(0, n, 0)
    while libc.semop(semid, ctypes.byref(b), 1) == -1:
        if ctypes.get_errno() != 4:  # EINTR: again
            check(-1)


def set_text(text):
    data = text.encode()[: SIZE - 16]
    op(-1)
    seg[8:12] = struct.pack("I", len(data))
    seg[16 : 16 + len(data)] = data
    op(1)


set_text("written at the cold start")

child = os.fork()
if child == 0:
    while True:
        op(-1)
        (c,) = struct.unpack("Q", seg[0:8])
        seg[0:8] = struct.pack("Q", c + 1)
        op(1)
        time.sleep(0.05)


class Handler(json_http.Handler):
    def do_GET(self):
        op(-1)
        (n,) = struct.unpack("I", seg[8:12])
        body = {"text": seg[16 : 16 + n].decode(), "counter": struct.unpack("Q", seg[0:8])[0]}
        op(1)
        body.update(sem=libc.semctl(semid, 0, GETVAL), shmid=shmid, semid=semid)
        self.reply(body)

    def do_POST(self):
        set_text(self.body())
        self.reply({})


print(f"sysv_ipc: shm {shmid} and semaphore {semid} shared with child {child}", flush=True)
json_http.serve(PORT, Handler)
