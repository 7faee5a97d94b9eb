"""Test backend: inside a netns (and optionally a cgroup), answer each TCP connection on PORT
with "<name> <peer-ip>\n". Prints "ready" once listening."""

from __future__ import annotations

import argparse
import ctypes
import os
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        try:
            self.request.recv(4096)
            self.request.sendall(f"{self.server.name} {self.client_address[0]}\n".encode())  # type: ignore[attr-defined]
        except OSError:
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args()
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    fd = os.open(a.netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit(f"setns {a.netns} failed")
    srv = Server(("0.0.0.0", a.port), Handler)
    srv.name = a.name  # type: ignore[attr-defined]
    print("ready", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
