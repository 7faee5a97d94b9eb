"""Test client: from inside a pod (its netns and cgroup), open N TCP connections to TARGET.

Each connection sends a line and reads the server's one-line reply ("<name> ..."). Prints one
JSON object: {"ok": n, "fail": n, "replies": {name: count}, "errors": {errno-name: count}}.
Used by the daemon integration tests; bounded in count and time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--target", required=True, help="IP:PORT")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    a = ap.parse_args()
    if a.cgroup:
        with open(os.path.join(a.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    fd = os.open(a.netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit(f"setns {a.netns} failed")
    host, _, port = a.target.rpartition(":")
    ok = fail = 0
    replies: dict[str, int] = {}
    errors: dict[str, int] = {}
    deadline = time.monotonic() + a.max_seconds
    for _ in range(a.n):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=a.timeout) as s:
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
                replies[name] = replies.get(name, 0) + 1
                ok += 1
        except OSError as exc:
            fail += 1
            key = type(exc).__name__ if not exc.errno else os.strerror(exc.errno)
            errors[key] = errors.get(key, 0) + 1
        if a.interval:
            time.sleep(a.interval)
    print(json.dumps({"ok": ok, "fail": fail, "replies": replies, "errors": errors}))


if __name__ == "__main__":
    main()
