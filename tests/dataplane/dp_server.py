"""Test backend: inside a netns, answer each TCP connection on :PORT (v4 and v6) with its name.

Protocol: the client sends one line; the reply is "<name> <peer-ip> <local-port>\n" (or a tiny
HTTP/1.0 response with the name as body when the line is an HTTP request). Prints "ready".
"""

from __future__ import annotations

import argparse
import ctypes
import os
import socket
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        try:
            line = self.request.recv(4096)
        except OSError:
            return
        name = self.server.name  # type: ignore[attr-defined]
        if line.startswith(b"GET "):
            body = name.encode()
            self.request.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            peer = self.client_address[0]
            if peer.startswith("::ffff:"):
                peer = peer[7:]
            self.request.sendall(f"{name} {peer} {self.server.server_address[1]}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args()
    fd = os.open(a.netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit(f"setns {a.netns} failed")
    srv = Server(("::", a.port), Handler)
    srv.name = a.name  # type: ignore[attr-defined]
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
