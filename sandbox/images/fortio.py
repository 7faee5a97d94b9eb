"""The sandbox's stand-in for the fortio server image: a small threaded HTTP/1.1 server.

Every response carries ``Server: <server-name>`` (the kubelet passes ``fortio-<version label>``) so a
client can see which version answered, as in the seed's curl loop. Paths: anything returns a short
text body naming the server and host; ``/echo`` echoes the request body; ``?size=N`` pads the body
to N bytes (load tests). Keep-alive is supported.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


def make_handler(server_name: str) -> type[BaseHTTPRequestHandler]:
    hostname = socket.gethostname()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def version_string(self) -> str:
            return server_name

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            sys.stderr.write(f"{self.client_address[0]} {format % args}\n")

        def _reply(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            body = f"{server_name} {hostname}\n".encode()
            size = parse_qs(url.query).get("size")
            if size and size[0].isdigit():
                n = min(int(size[0]), 10 * 1024 * 1024)
                body = (body + b"." * n)[:n] if n >= len(body) else body[:n]
            self._reply(body)

        do_HEAD = do_GET

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length) if length else b""
            self._reply(data if urlparse(self.path).path.startswith("/echo") else f"{server_name}\n".encode())

        do_PUT = do_POST

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--server-name", default="fortio")
    p.add_argument("--bind", default="0.0.0.0")
    a = p.parse_args(argv)
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    httpd = ThreadingHTTPServer((a.bind, a.port), make_handler(a.server_name))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write(f"fortio stand-in {a.server_name} listening on {a.bind}:{a.port}\n")
    sys.stderr.flush()
    try:
        httpd.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
