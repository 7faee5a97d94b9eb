"""tcx links of the authz program on an enrolled pod's interfaces, made inside its netns.

Why tcx links (BPF_LINK_CREATE, BPF_TCX_INGRESS, kernel >= 6.6) and not a netlink clsact
filter: a link is owned by the file that pins it, so enforcement survives the daemon being
killed, and a new daemon swaps in its freshly loaded program with one atomic BPF_LINK_UPDATE;
links also coexist with other tc programs (CNIs) instead of replacing them. An ifindex only
means something inside its netns, so the link is created from a thread that entered it.

Pins: ``<pin_dir>/authz-link-<netns cookie>-<ifindex>`` (files beside the generation
directories, which hold only maps); removing the pin (and closing our fd) detaches the program.
"""

from __future__ import annotations

import ctypes as ct
import logging
import os
import re
import socket
import struct
from pathlib import Path

from daemon.dataplane import bpfsys
from daemon.dataplane.netns import _in_netns

log = logging.getLogger("daemon.authz")

BPF_OBJ_PIN = 6
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_TCX_INGRESS = 46
PIN_RE = re.compile(r"^authz-link-(\d+)-(\d+)$")


def _link_create(prog_fd: int, ifindex: int) -> int:
    attr = ct.create_string_buffer(64)
    struct.pack_into("=IIII", attr, 0, prog_fd, ifindex, BPF_TCX_INGRESS, 0)
    return bpfsys._bpf(BPF_LINK_CREATE, attr)


def _obj_pin(fd: int, path: str) -> None:
    cpath = ct.create_string_buffer(os.fsencode(path))
    attr = ct.create_string_buffer(16)
    struct.pack_into("=QI", attr, 0, ct.addressof(cpath), fd)
    bpfsys._bpf(BPF_OBJ_PIN, attr)


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program of a link atomically (every packet sees the old or the new one)."""
    attr = ct.create_string_buffer(16)
    struct.pack_into("=IIII", attr, 0, link_fd, prog_fd, 0, 0)
    bpfsys._bpf(BPF_LINK_UPDATE, attr)


def link_info(fd: int) -> dict[str, int]:
    """type, id, prog_id and (tcx) ifindex of a link fd."""
    info = ct.create_string_buffer(64)
    attr = ct.create_string_buffer(16)
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ct.addressof(info))
    bpfsys._bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD, attr)
    ltype, lid, prog_id = struct.unpack_from("=III", info, 0)
    ifindex = struct.unpack_from("=I", info, 16)[0]
    return {"type": ltype, "id": lid, "prog_id": prog_id, "ifindex": ifindex}


def _interfaces_here() -> list[tuple[int, str]]:
    """Every interface of the current netns but loopback (a pod's traffic from peers)."""
    return [(idx, name) for idx, name in socket.if_nameindex() if name != "lo"]


class Links:
    """The pinned authz links of this node."""

    def __init__(self, pin_dir: Path) -> None:
        self.dir = Path(pin_dir)

    def pinned(self) -> dict[int, list[Path]]:
        """netns cookie -> pin paths."""
        out: dict[int, list[Path]] = {}
        for p in sorted(self.dir.iterdir()):
            m = PIN_RE.match(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(p)
        return out

    def attach(self, netns: str | Path, cookie: int, prog_fd: int) -> list[str]:
        """Link prog to the ingress of every up, non-loopback interface of the netns (idempotent:
        interfaces already linked get the program swapped in). Returns the interface names."""
        names: list[str] = []

        def run() -> None:
            for idx, name in _interfaces_here():
                pin = self.dir / f"authz-link-{cookie}-{idx}"
                if pin.exists():
                    fd = bpfsys.obj_get(str(pin))
                    try:
                        link_update(fd, prog_fd)
                    finally:
                        os.close(fd)
                else:
                    fd = _link_create(prog_fd, idx)
                    try:
                        _obj_pin(fd, str(pin))
                    finally:
                        os.close(fd)
                names.append(name)

        _in_netns(netns, run)
        return names

    def update_all(self, prog_fd: int) -> int:
        """Swap a newly loaded program into every pinned link (daemon restart)."""
        n = 0
        for paths in self.pinned().values():
            for pin in paths:
                try:
                    fd = bpfsys.obj_get(str(pin))
                except OSError:
                    continue
                try:
                    link_update(fd, prog_fd)
                    n += 1
                except OSError as exc:  # the interface is gone: the link is defunct
                    log.debug("authz link %s not updated: %s", pin.name, exc)
                finally:
                    os.close(fd)
        return n

    def detach(self, cookie: int) -> None:
        for pin in self.pinned().get(cookie, []):
            pin.unlink(missing_ok=True)

    def describe(self) -> list[dict[str, int | str]]:
        out: list[dict[str, int | str]] = []
        for cookie, paths in self.pinned().items():
            for pin in paths:
                row: dict[str, int | str] = {"netns_cookie": cookie, "pin": pin.name}
                try:
                    fd = bpfsys.obj_get(str(pin))
                    try:
                        row.update(link_info(fd))
                    finally:
                        os.close(fd)
                except OSError as exc:
                    row["error"] = str(exc)
                out.append(row)
        return out
