"""Client of the waypoint tests: from a pod's netns and cgroup, connect to TARGET, send the
payload file in one of several ways, shut the write side down, read the answer to EOF, and
print {"peer", "sock", "reply", "error", "errno", "seconds"} as JSON.

Modes (each ends with shutdown(SHUT_WR) right after the last write):
  send      one sendall() of the whole payload (1 byte, 4 MiB, ...)
  writev    sendmsg() with the payload cut into several buffers
  sendfile  os.sendfile() from the payload file
  splice    os.splice() from a pipe the payload is written into
  small     many 3-byte send() calls
  pause     1000 bytes, "paused" on stdout, 1.5 s pause, the rest
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from podns import enter  # noqa: E402


def target(t: str) -> tuple[int, tuple[str, int]]:
    host, _, port = t.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, (host[1:-1], int(port))
    return socket.AF_INET, (host, int(port))


def send(s: socket.socket, mode: str, path: Path) -> None:
    data = path.read_bytes()
    if mode == "send":
        s.sendall(data)
    elif mode == "writev":
        cuts = [0, 1, 7, len(data) // 3, len(data) // 2, len(data)]
        bufs = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        sent = s.sendmsg(bufs)
        if sent < len(data):
            s.sendall(data[sent:])
    elif mode == "sendfile":
        with open(path, "rb") as f:
            off = 0
            while off < len(data):
                off += os.sendfile(s.fileno(), f.fileno(), off, len(data) - off)
    elif mode == "splice":
        r, w = os.pipe()

        def feed() -> None:
            with os.fdopen(w, "wb") as wf:
                wf.write(data)

        t = threading.Thread(target=feed)
        t.start()
        left = len(data)
        while left:
            n = os.splice(r, s.fileno(), left)
            if n == 0:
                break
            left -= n
        t.join()
        os.close(r)
    elif mode == "pause":  # a first write, a pause (the test looks at the maps), the rest
        s.sendall(data[:1000])
        print("paused", flush=True)
        time.sleep(1.5)
        s.sendall(data[1000:])
    elif mode == "small":
        for i in range(0, len(data), 3):
            s.send(data[i:i + 3])
    else:
        raise SystemExit(f"unknown mode {mode}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--cgroup", default="")
    ap.add_argument("--target", required=True)
    ap.add_argument("--mode", default="send")
    ap.add_argument("--payload", required=True)
    ap.add_argument("--dual-stack", action="store_true", help="AF_INET6 socket to ::ffff:a.b.c.d")
    a = ap.parse_args()
    enter(a.netns, a.cgroup)
    fam, addr = target(a.target)
    if a.dual_stack and fam == socket.AF_INET:
        fam, addr = socket.AF_INET6, ("::ffff:" + addr[0], addr[1])
    out: dict = {"peer": None, "sock": None, "reply": "", "error": "", "errno": 0}
    t0 = time.monotonic()
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            s.connect(addr)
            out["peer"] = list(s.getpeername()[:2])
            out["sock"] = list(s.getsockname()[:2])
            s.settimeout(None)  # blocking: sendfile/splice would see EAGAIN on a timeout socket
            send(s, a.mode, Path(a.payload))
            s.shutdown(socket.SHUT_WR)
            s.settimeout(20)
            chunks = []
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
            out["reply"] = b"".join(chunks).decode(errors="replace")
    except OSError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["errno"] = exc.errno or 0
    out["seconds"] = time.monotonic() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
