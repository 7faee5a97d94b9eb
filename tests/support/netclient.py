"""Test client: from inside a pod (its netns and, optionally, cgroup), open N TCP connections
to TARGET and report what answered, as one JSON object on stdout.

Each connection: connect, getpeername, send one line, read the backend's reply line
("<name> ..."), close. Output keys:
  ok, fail          connections that got a reply / that did not (fail = n - ok)
  counts, replies   {backend name: connections} (same dict; "replies" is the daemon tests' name)
  peers             sorted distinct "ip:port" the client saw as its peer
  errors            first 10 failures as "ExceptionType: message"
  error_counts      {strerror or exception type: count}
  fail_times        seconds since start of each failure
Bounded in count (-n) and time (--max-seconds). Used by tests/daemon and tests/dataplane.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections import Counter

from podns import enter


def parse_target(t: str) -> tuple[int, str, int]:
    """"IP:PORT" or "[IPv6]:PORT" -> (address family, host, port)."""
    host, _, port = t.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def _exchange(fam: int, host: str, port: int, timeout: float) -> tuple[str, str]:
    """One connection; returns (backend name, peer "ip:port")."""
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        pn = s.getpeername()
        s.sendall(b"hello\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        name = data.decode().split(" ", 1)[0].strip()
        if not name:
            raise ConnectionError("empty reply")
        return name, f"{pn[0]}:{pn[1]}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--target", required=True, help="IP:PORT or [IPv6]:PORT")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--rate", type=float, default=0.0, help="connections per second, 0 = back to back")
    ap.add_argument("--interval", type=float, default=0.0, help="pause after each connection, seconds")
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    a = ap.parse_args()
    enter(a.netns, a.cgroup)
    fam, host, port = parse_target(a.target)
    counts: Counter[str] = Counter()
    peers: set[str] = set()
    errors: list[str] = []
    error_counts: Counter[str] = Counter()
    fail_times: list[float] = []
    ok = 0
    start = time.monotonic()
    for i in range(a.n):
        if time.monotonic() - start > a.max_seconds:
            break
        if a.rate:
            delay = start + i / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            name, peer = _exchange(fam, host, port, a.timeout)
            counts[name] += 1
            peers.add(peer)
            ok += 1
        except OSError as exc:
            fail_times.append(round(time.monotonic() - start, 3))
            if len(errors) < 10:
                errors.append(f"{type(exc).__name__}: {exc}")
            error_counts[os.strerror(exc.errno) if exc.errno else type(exc).__name__] += 1
        if a.interval:
            time.sleep(a.interval)
    print(json.dumps({"ok": ok, "fail": a.n - ok, "counts": dict(counts), "replies": dict(counts),
                      "peers": sorted(peers), "errors": errors, "error_counts": dict(error_counts),
                      "fail_times": fail_times}))


if __name__ == "__main__":
    main()
