"""In-netns helper for the authz tests: a TCP client or a counting server, run by path.

client: reads JSON lines {"src", "dst", "port", "timeout"} on stdin; for each, connects from
``src`` (bound) to ``dst:port``, reads the server's greeting, and writes one JSON line
{"result": "ok"|"refused"|"reset"|"timeout"|"error:<errno>", "ms": <time to the outcome>}.
server: listens on every given port and appends "<peer-ip> <port>" to --log for each accepted
connection (so a test can prove a refused connection never reached the process).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import socket
import sys
import threading
import time


def enter(netns: str, cgroup: str = "") -> None:
    if cgroup:  # first: the daemon finds a pod's netns through its processes' cgroup
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    fd = os.open(netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit(f"setns {netns} failed")
    os.close(fd)


def attempt(src: str, dst: str, port: int, timeout: float) -> dict:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    t0 = time.perf_counter()
    try:
        if src:
            s.bind((src, 0))
        s.connect((dst, port))
        s.sendall(b"hello\n")
        data = s.recv(100)
        result = "ok" if data else "closed"
    except ConnectionRefusedError:
        result = "refused"
    except ConnectionResetError:
        result = "reset"
    except TimeoutError:
        result = "timeout"
    except OSError as e:
        result = f"error:{errno.errorcode.get(e.errno or 0, e.errno)}"
    finally:
        s.close()
    return {"result": result, "ms": round((time.perf_counter() - t0) * 1000, 3)}


def client() -> None:
    held: dict[int, socket.socket] = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op", "attempt")
        if op == "open":  # an established connection kept for later (policies arriving meanwhile)
            s = socket.create_connection((req["dst"], int(req["port"])), timeout=2.0)
            held[int(req["id"])] = s
            out = {"result": "open"}
        elif op == "finish":  # use the held connection now: send, read the greeting
            s = held.pop(int(req["id"]))
            try:
                s.sendall(b"hello\n")
                out = {"result": "ok" if s.recv(100) else "closed"}
            except OSError as e:
                out = {"result": f"error:{errno.errorcode.get(e.errno or 0, e.errno)}"}
            finally:
                s.close()
        else:
            out = attempt(req.get("src", ""), req["dst"], int(req["port"]), float(req.get("timeout", 2.0)))
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def server(ports: list[int], log: str) -> None:
    lock = threading.Lock()

    def serve(port: int) -> None:
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind(("::", port))
        ls.listen(512)
        ready.release()
        while True:
            c, peer = ls.accept()
            ip = peer[0][7:] if peer[0].startswith("::ffff:") else peer[0]
            with lock, open(log, "a") as f:
                f.write(f"{ip} {port}\n")
            try:
                c.settimeout(2)
                c.recv(100)
                c.sendall(b"hi\n")
            except OSError:
                pass
            c.close()

    ready = threading.Semaphore(0)
    for p in ports:
        threading.Thread(target=serve, args=(p,), daemon=True).start()
    for _ in ports:
        ready.acquire()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("client", "server"))
    ap.add_argument("--netns", required=True)
    ap.add_argument("--ports", default="8080")
    ap.add_argument("--log", default="/dev/null")
    ap.add_argument("--cgroup", default="")
    a = ap.parse_args()
    enter(a.netns, a.cgroup)
    if a.mode == "client":
        client()
    else:
        server([int(p) for p in a.ports.split(",")], a.log)
