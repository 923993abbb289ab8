#!/usr/bin/python3
"""A service that tries to make root open what it controls (tests/security/files.rs).

  DIR     a directory the service user owns
  DECOY   none | fifo | zero: what is planted at `DIR/lib x.so` (one space) beside the
          executable mapping of `DIR/lib  x.so` (two spaces)
  SHM     optional: the name of a /dev/shm entry to make
  SHM_KIND  fifo (a FIFO held open for reading, without a writer) | sparse (96 MiB, 4 KiB used)

Writes DIR/ready once all is in place, then sleeps.
"""
import mmap
import os
import time

DIR = os.environ["DIR"]
DECOY = os.environ.get("DECOY", "none")
real = os.path.join(DIR, "lib  x.so")
decoy = os.path.join(DIR, "lib x.so")

for p in (real, decoy):
    if os.path.lexists(p):
        os.unlink(p)
with open(real, "wb") as f:
    f.write(b"\x7fnot really ELF, only mapped executable\n" * 200)
fd = os.open(real, os.O_RDONLY)
lib = mmap.mmap(fd, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_EXEC)
os.close(fd)

if DECOY == "fifo":
    os.mkfifo(decoy, 0o600)
elif DECOY == "zero":
    os.symlink("/dev/zero", decoy)

held = []
shm = os.environ.get("SHM")
if shm:
    path = "/dev/shm/" + shm
    if os.environ["SHM_KIND"] == "fifo":
        if not os.path.exists(path):
            os.mkfifo(path, 0o600)
        held.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, 96 << 20)
        os.pwrite(fd, b"sparse-marker" + b"\x01" * 4083, 40 << 20)
        held.append(mmap.mmap(fd, 96 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        os.close(fd)

with open(os.path.join(DIR, "ready"), "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.2)
