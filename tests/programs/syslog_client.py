#!/usr/bin/python3
"""Logs the way a daemon logs to syslog: a unix datagram socket connected to LOG_SOCKET (think
/dev/log), whose server is outside the service. Sends a numbered message every 50 ms through the
same connected socket for as long as it runs; counts sends that failed.

  GET / -> JSON: {"sent": n, "failed": n}
"""
import os
import socket
import threading
import time

import json_http

PORT = int(os.environ["PORT"])
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.connect(os.environ["LOG_SOCKET"])
state = {"sent": 0, "failed": 0}


def logger():
    n = 0
    while True:
        n += 1
        try:
            log.send(f"<14>syslog_client[{os.getpid()}]: message {n}".encode())
            state["sent"] = n
        except OSError:
            state["failed"] += 1
        time.sleep(0.05)


class Handler(json_http.Handler):
    def do_GET(self):
        self.reply(state)


threading.Thread(target=logger, daemon=True).start()
json_http.serve(PORT, Handler)
