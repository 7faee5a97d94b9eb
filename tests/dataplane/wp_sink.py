"""A stand-in waypoint for the byte-exact tests: inside a netns, accept TCP on the given ports,
read each stream to EOF, store it verbatim as <dir>/<port>-<n>.bin, answer "got <len>\\n" and
close. It does not parse anything: the test decodes the hand-off header from the stored bytes
with its own decoder. Prints "ready" once listening (dual-stack [::])."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from podns import enter  # noqa: E402

LIMIT = 64 << 20  # never buffer more than this per connection


def serve(ls: socket.socket, out: Path, port: int) -> None:
    n = 0
    lock = threading.Lock()

    def one(conn: socket.socket, idx: int) -> None:
        with conn:
            conn.settimeout(20)
            chunks, total = [], 0
            try:
                while total < LIMIT:
                    b = conn.recv(1 << 16)
                    if not b:
                        break
                    chunks.append(b)
                    total += len(b)
                tmp = out / f".{port}-{idx}.tmp"
                tmp.write_bytes(b"".join(chunks))
                tmp.rename(out / f"{port}-{idx}.bin")
                conn.sendall(b"got %d\n" % total)
            except OSError:
                pass

    while True:
        conn, _ = ls.accept()
        with lock:
            n += 1
            idx = n
        threading.Thread(target=one, args=(conn, idx), daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--port", type=int, action="append", required=True)
    a = ap.parse_args()
    enter(a.netns)
    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    for port in a.port:
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(("::", port))
        ls.listen(128)
        threading.Thread(target=serve, args=(ls, out, port), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
