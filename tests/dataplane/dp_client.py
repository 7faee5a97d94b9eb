"""Test client: join a cgroup, enter a netns, make N connections to a target, report as JSON.

Each connection: connect, optional getpeername, send one line, read the backend's reply line,
close. Output: {"ok", "fail", "counts": {backend: n}, "peers": [...], "errors": [...],
"fail_times": [...]} on stdout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import time
from collections import Counter


def parse_target(t: str) -> tuple[int, str, int]:
    host, _, port = t.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--target", required=True)
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.0, help="connections per second, 0 = back to back")
    ap.add_argument("--timeout", type=float, default=2.0)
    a = ap.parse_args()
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    fd = os.open(a.netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit(f"setns {a.netns} failed")
    fam, host, port = parse_target(a.target)
    counts: Counter[str] = Counter()
    peers: set[str] = set()
    errors: list[str] = []
    fail_times: list[float] = []
    ok = 0
    start = time.monotonic()
    for i in range(a.n):
        if a.rate:
            delay = start + i / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(a.timeout)
                s.connect((host, port))
                pn = s.getpeername()
                peers.add(f"{pn[0]}:{pn[1]}")
                s.sendall(b"hello\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    data += chunk
                name = data.decode().split(" ")[0].strip()
                if not name:
                    raise OSError("empty reply")
                counts[name] += 1
                ok += 1
        except OSError as exc:
            fail_times.append(round(time.monotonic() - start, 3))
            if len(errors) < 10:
                errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"ok": ok, "fail": a.n - ok, "counts": dict(counts), "peers": sorted(peers),
                      "errors": errors, "fail_times": fail_times}))


if __name__ == "__main__":
    main()
