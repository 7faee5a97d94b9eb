"""Network-namespace helpers: the enrolment control connect and the netns cookie.

Both work by making a socket *inside* the target netns. ``setns`` on a dedicated thread
changes only that thread's namespace, so no fork is needed (safe in a threaded daemon). The
control connect must come from a process inside the cgroup the programs are attached to; when
the caller is not (tests attach to a child cgroup), pass ``cgroup=`` and a short-lived child
process joins that cgroup first.
"""

from __future__ import annotations

import ctypes as ct
import ctypes.util
import errno
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71
CONTROL_V4 = "0.0.0.2"
CONTROL_V6 = "::2"
PORT_ENABLE = 929
PORT_DISABLE = 930

_libc = ct.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
T = TypeVar("T")


def netns_path(netns: str | Path) -> Path:
    """A /proc/<pid>/ns/net or /run/netns/<name> path; a bare name means /run/netns/<name>."""
    p = Path(netns)
    if not p.is_absolute():
        p = Path("/run/netns") / p
    if not p.exists():
        raise ValueError(f"network namespace {netns} not found ({p} does not exist)")
    return p


def _in_netns(netns: str | Path, fn: Callable[[], T]) -> T:
    path = netns_path(netns)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ct.get_errno()
                    raise OSError(err, f"setns {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="kmesh-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _cookie_here() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), sys.byteorder)


def netns_cookie(netns: str | Path) -> int:
    """SO_NETNS_COOKIE of a socket made in that netns (what the BPF programs key enrolment on)."""
    return _in_netns(netns, _cookie_here)


def _control_here(enable: bool, ipv6: bool) -> int:
    fam = socket.AF_INET6 if ipv6 else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        err = s.connect_ex((CONTROL_V6 if ipv6 else CONTROL_V4, PORT_ENABLE if enable else PORT_DISABLE))
        if err == errno.EINPROGRESS:  # not ours; learn how it ended (1 s at most)
            select.select([], [s], [], 1.0)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EINPROGRESS
        return err


_CHILD = """
import ctypes, errno, os, select, socket, sys
cg, ns, fam, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if cg:
    open(os.path.join(cg, "cgroup.procs"), "w").write(str(os.getpid()))
fd = os.open(ns, os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
    sys.exit(100)
s = socket.socket(fam, socket.SOCK_STREAM)
s.setblocking(False)
err = s.connect_ex(("::2" if fam == socket.AF_INET6 else "0.0.0.2", port))
if err == errno.EINPROGRESS:
    select.select([], [s], [], 1.0)
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.EINPROGRESS
print(err)
"""


def control_connect(netns: str | Path, enable: bool, ipv6: bool = False, cgroup: Path | None = None) -> None:
    """Enable (929) or disable (930) translation for a netns via the control address.

    The connect program records/deletes the netns cookie and rejects the connect with EPERM, so
    no packet is ever sent; any other outcome means no program saw it (wrong cgroup, programs not
    attached) or the manage map is full, and raises RuntimeError.
    """
    path = netns_path(netns)
    if cgroup is None:
        err = _in_netns(path, lambda: _control_here(enable, ipv6))
    else:
        fam = socket.AF_INET6 if ipv6 else socket.AF_INET
        port = PORT_ENABLE if enable else PORT_DISABLE
        out = subprocess.run([sys.executable, "-c", _CHILD, str(cgroup), str(path), str(int(fam)), str(port)],
                             capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"control connect helper failed: {out.stderr.strip()[-300:]}")
        err = int(out.stdout.strip())
    if err != errno.EPERM:
        what = "enable" if enable else "disable"
        raise RuntimeError(f"control connect ({what}) for {netns} was not taken by the data plane "
                           f"(connect returned {errno.errorcode.get(err, err)}); is the caller inside "
                           f"the attached cgroup and the manage map not full?")
