#!/usr/bin/python3
"""Holds MIB mebibytes of random bytes (drawn at the cold start) and answers GET / with their
SHA-256 and a token drawn at the start: the same answer after a restore means the same memory."""
import hashlib
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

memory = bytearray(os.urandom(int(os.environ["MIB"]) << 20))
token = os.urandom(8).hex()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{token} {hashlib.sha256(memory).hexdigest()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
