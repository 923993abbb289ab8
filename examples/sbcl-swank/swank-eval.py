#!/usr/bin/python3
"""Evaluates one Lisp expression through Swank and prints the printed result.

Usage: swank-eval.py PORT EXPRESSION    e.g. swank-eval.py 4420 '(hash-table-count *notes*)'

Swank's wire format: each message is 6 hex digits giving the byte length, then an s-expression.
"""
import re
import socket
import sys


def frame(sexp):
    data = sexp.encode()
    return b"%06x" % len(data) + data


def read_msg(sock):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("swank closed the connection")
            buf += chunk
        return buf
    return exactly(int(exactly(6), 16)).decode()


def swank_eval(port, expr):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        quoted = expr.replace("\\", "\\\\").replace('"', '\\"')
        s.sendall(frame(f'(:emacs-rex (swank:eval-and-grab-output "{quoted}") "COMMON-LISP-USER" t 1)'))
        while True:
            msg = read_msg(s)
            if msg.startswith("(:return"):
                m = re.match(r'\(:return \(:ok \("(?:[^"\\]|\\.)*" "((?:[^"\\]|\\.)*)"\)\) 1\)', msg)
                if not m:
                    raise RuntimeError(f"unexpected reply: {msg}")
                return m.group(1).replace('\\"', '"').replace("\\\\", "\\")


if __name__ == "__main__":
    print(swank_eval(int(sys.argv[1]), sys.argv[2]))
