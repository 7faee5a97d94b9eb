"""Loopback backends for the waypoint tests, run as threads of the test process.

``SinkServer`` proves byte-exactness: on accept it greets (``hi\\n``: the client waits for it
before half-closing, so its FIN never races Envoy's listener filters), reads to EOF and answers
``<sha256> <bytes> <local ip> <local port>``. ``HttpServer`` answers every GET with its name and
the address it was reached at, so a test can tell which chain and cluster a request took.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import socketserver
import threading
from dataclasses import dataclass, field

GREETING = b"hi\n"


def _strip_v4_mapped(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") else ip


class _Tcp(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 128


class _Tcp6(_Tcp):
    address_family = socket.AF_INET6


@dataclass
class Backend:
    server: socketserver.BaseServer
    ip: str
    port: int
    accepted: list[tuple[str, int]] = field(default_factory=list)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _serve(server: socketserver.BaseServer) -> None:
    threading.Thread(target=server.serve_forever, name="backend", daemon=True).start()


class _SinkHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(60)
        local = sock.getsockname()
        self.server.backend.accepted.append((_strip_v4_mapped(local[0]), local[1]))  # type: ignore[attr-defined]
        h = hashlib.sha256()
        n = 0
        try:
            sock.sendall(GREETING)
            while chunk := sock.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
            sock.sendall(f"{h.hexdigest()} {n} {_strip_v4_mapped(local[0])} {local[1]}\n".encode())
        except OSError:
            pass


def sink_server(ip: str, port: int = 0) -> Backend:
    cls = _Tcp6 if ":" in ip else _Tcp
    server = cls((ip, port), _SinkHandler)
    backend = Backend(server, ip, server.server_address[1])
    server.backend = backend  # type: ignore[attr-defined]
    _serve(server)
    return backend


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        local = self.connection.getsockname()
        body = f"{self.server.name} {self.path} {_strip_v4_mapped(local[0])} {local[1]}\n".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Http(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Http6(_Http):
    address_family = socket.AF_INET6


def http_server(ip: str, name: str, port: int = 0) -> Backend:
    cls = _Http6 if ":" in ip else _Http
    server = cls((ip, port), _HttpHandler)
    server.name = name  # type: ignore[attr-defined]
    backend = Backend(server, ip, server.server_address[1])
    _serve(server)
    return backend
