"""Test backend: inside a netns (and optionally a cgroup), answer each TCP connection on PORT
with its name. Prints "ready" once listening.

Protocol: the client sends one line; the reply is "<name> <peer-ip> <local-port>\n" (or a tiny
HTTP/1.0 response with the name as body when the line is an HTTP request). Listens dual-stack
on [::] by default, or on 0.0.0.0 only with --ipv4-only. Used by tests/daemon and tests/dataplane.
"""

from __future__ import annotations

import argparse
import socket
import socketserver

from podns import enter


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        try:
            line = self.request.recv(4096)
            name = self.server.name  # type: ignore[attr-defined]
            if line.startswith(b"GET "):
                body = name.encode()
                self.request.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                peer = self.client_address[0]
                if peer.startswith("::ffff:"):
                    peer = peer[7:]
                self.request.sendall(f"{name} {peer} {self.server.server_address[1]}\n".encode())
        except OSError:
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512


class DualStackServer(Server):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--ipv4-only", action="store_true", help="listen on 0.0.0.0 instead of dual-stack [::]")
    a = ap.parse_args()
    enter(a.netns, a.cgroup)
    if a.ipv4_only:
        srv: Server = Server(("0.0.0.0", a.port), Handler)
    else:
        srv = DualStackServer(("::", a.port), Handler)
    srv.name = a.name  # type: ignore[attr-defined]
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
