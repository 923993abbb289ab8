#!/usr/bin/env python3
# Action script for the uffd-wp tracker prototype: at "uffd-wp-tracker", takes the descriptor
# CRTOOLS_SCRIPT_FD names from criu (pidfd_getfd) and keeps it in a holder process (120 s),
# standing in for the RPC client that would keep it between dumps.
import os, ctypes, sys, time
if os.environ.get("CRTOOLS_SCRIPT_ACTION") != "uffd-wp-tracker":
    sys.exit(0)
libc = ctypes.CDLL(None, use_errno=True)
ppid = os.getppid()
pfd = libc.syscall(434, ppid, 0)
fd = libc.syscall(438, pfd, int(os.environ["CRTOOLS_SCRIPT_FD"]), 0)
open(os.environ.get("WP_DIR", "/tmp/uffd-wp-proto") + "/grabbed", "a").write(f"{fd}\n")
if fd >= 0 and os.fork() == 0:
    os.setsid()
    devnull = os.open("/dev/null", os.O_RDWR)
    for f in (0, 1, 2): os.dup2(devnull, f)
    time.sleep(120)
    os._exit(0)
