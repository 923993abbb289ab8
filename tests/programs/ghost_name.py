#!/usr/bin/python3
"""A service that holds open a deleted file whose name is made to attack a terminal.

In GHOST_DIR it creates a 2 MiB file (over CRIU's default 1 MiB ghost-file limit, so a dump
fails and CRIU's error names the file) whose name sets the terminal's title, erases the line
and forges a verdict; it unlinks the file, keeps it open, prints "ready" and sleeps.
"""
import os
import sys
import time

NAME = "evil\x1b]0;pwned\x07\x1b[2K\rOK checkpoint 20991231T000000.000Z saved\x9b"

path = os.path.join(os.environ["GHOST_DIR"], NAME)
f = open(path, "wb")
f.write(b"x" * (2 << 20))
f.flush()
os.unlink(path)
print("ready", flush=True)
while True:
    time.sleep(60)
