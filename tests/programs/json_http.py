"""The small HTTP side the test programs share: one request handler base that answers JSON (or
plain text) and logs nothing, and a server on loopback."""
import json
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def reply(self, body):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode()

    def log_message(self, *a):
        pass


def serve(port, handler):
    HTTPServer(("127.0.0.1", int(port)), handler).serve_forever()
