#!/usr/bin/python3
"""Holds MIB mebibytes of random bytes (drawn at the cold start) and answers GET / with their
SHA-256 and a token drawn at the start: the same answer after a restore means the same memory."""
import hashlib
import os

import json_http

memory = bytearray(os.urandom(int(os.environ["MIB"]) << 20))
token = os.urandom(8).hex()


class Handler(json_http.Handler):
    def do_GET(self):
        self.reply(f"{token} {hashlib.sha256(memory).hexdigest()}")


json_http.serve(int(os.environ["PORT"]), Handler)
