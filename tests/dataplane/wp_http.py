"""HTTP client of the waypoint tests: from a pod's netns and cgroup, N requests, each on a new
connection (GET / HTTP/1.1, Connection: close), read to EOF. Prints JSON: ok, fail, bodies
{body: count}, statuses, peers (getpeername), errors (first 10), fail_times."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from podns import enter  # noqa: E402


def one(fam: int, addr: tuple[str, int], host: str, timeout: float) -> tuple[int, str, str]:
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(addr)
        peer = s.getpeername()
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            data += b
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace").strip(), f"{peer[0]}:{peer[1]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--target", required=True)
    ap.add_argument("--host", default="svc")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()
    enter(a.netns, a.cgroup)
    h, _, p = a.target.rpartition(":")
    fam = socket.AF_INET6 if h.startswith("[") else socket.AF_INET
    addr = (h.strip("[]"), int(p))
    bodies: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
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
            status, body, peer = one(fam, addr, a.host, a.timeout)
            statuses[status] += 1
            peers.add(peer)
            if status == 200:
                bodies[body] += 1
                ok += 1
            else:
                fail_times.append(round(time.monotonic() - start, 3))
                if len(errors) < 10:
                    errors.append(f"HTTP {status}: {body[:80]}")
        except OSError as exc:
            fail_times.append(round(time.monotonic() - start, 3))
            if len(errors) < 10:
                errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"ok": ok, "fail": a.n - ok, "bodies": dict(bodies), "statuses": dict(statuses),
                      "peers": sorted(peers), "errors": errors, "fail_times": fail_times}))


if __name__ == "__main__":
    main()
