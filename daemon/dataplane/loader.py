"""Compile bpf/*.c with bcc in one module (so every program shares the pinned maps).

The compile runs in a short-lived child process (``python -m daemon.dataplane.loader``, see
``load_in_child``): bcc and the LLVM it carries cost ~120 MiB of resident memory that a
long-lived daemon would otherwise keep for its whole life. The child creates or reuses the
pinned maps, checks their layouts, loads the programs and hands the program fds and the ring
buffer fd to the parent over a unix socket (SCM_RIGHTS), then exits. The parent attaches the
programs with plain bpf(2) calls and does all map I/O itself (bpfsys, mapio, ringbuf); it never
imports bcc.

bcc can only rewrite map method calls (``km_frontend.lookup(...)``) in the main source text,
never in ``#include``d files, so local ``#include "x.h"`` lines are expanded here, each header
once, before the text reaches clang.
"""

from __future__ import annotations

import argparse
import ctypes as ct
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

from daemon.assets import bpf_dir
from daemon.dataplane import bpfsys, layout
from daemon.dataplane.mapio import MapIO
from daemon.dataplane.types import Capacity

REPO = Path(__file__).resolve().parents[2]  # checkout or site-packages: the child's PYTHONPATH
BPF_DIR = bpf_dir()  # packaged bpf/ (daemon.assets), or the checkout's
SOURCES = ("connect4.c", "connect6.c", "getpeername.c", "sockops.c", "handoff.c", "authz.c")
CGROUP2_MAGIC = 0x63677270

# program name -> attach type; all attach to the same cgroup
SOCK_ADDR_PROGRAMS = {
    "connect4": bpfsys.CGROUP_INET4_CONNECT,
    "connect6": bpfsys.CGROUP_INET6_CONNECT,
    "getpeername4": bpfsys.CGROUP_INET4_GETPEERNAME,
    "getpeername6": bpfsys.CGROUP_INET6_GETPEERNAME,
}
SOCKOPS_PROGRAMS = {"sockops": bpfsys.CGROUP_SOCK_OPS}
# sk_msg programs and the sockhash they attach to (at load: the pinned map keeps them attached)
SK_MSG_PROGRAMS = {"handoff": "km_wpsock"}
ATTACH_TYPES = {**SOCK_ADDR_PROGRAMS, **SOCKOPS_PROGRAMS}


def ensure_kernel_source() -> None:
    """bcc needs kernel headers: fall back to the merged tree `make setup` builds."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if Path(f"/lib/modules/{os.uname().release}/build").exists():
        return
    from daemon.assets import kernel_headers_fallback

    built = kernel_headers_fallback()
    os.environ["BCC_KERNEL_SOURCE"] = str(built or REPO / ".build" / "kernel-src")


def check_cgroup(cgroup: Path, allow_root: bool = False) -> Path:
    """A cgroup v2 directory that is not the root of its hierarchy (unless allow_root: a node
    agent's own cgroup2 mount, as Kmesh's /mnt/kmesh_cgroup2), else ValueError."""
    path = Path(cgroup).resolve()
    if not (path / "cgroup.procs").exists():
        raise ValueError(f"{path} is not a cgroup directory (no cgroup.procs)")
    buf = ct.create_string_buffer(128)
    if bpfsys._libc.statfs(os.fsencode(str(path)), buf) != 0 or \
            int.from_bytes(buf.raw[:8], "little") != CGROUP2_MAGIC:
        raise ValueError(f"{path} is not on a cgroup v2 filesystem")
    for line in Path("/proc/self/mountinfo").read_text().splitlines() if not allow_root else ():
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2" and Path(left.split(" ")[4]).resolve() == path:
            raise ValueError(f"refusing to attach at the cgroup v2 root {path}; use a child cgroup")
    return path


def expand_includes(path: Path, seen: set[str]) -> str:
    """Source text of path with local includes from bpf/include inlined once each."""
    out = []
    for line in path.read_text().splitlines():
        m = re.match(r'\s*#include\s+"([^"]+)"', line)
        if m:
            if m.group(1) not in seen:
                seen.add(m.group(1))
                out.append(expand_includes(BPF_DIR / "include" / m.group(1), seen))
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def build_text(gen_dir: Path, cap: Capacity) -> str:
    defs = {
        "KM_PIN_DIR": f'"{gen_dir}"',
        "KM_MAX_FRONTEND": cap.frontends,
        "KM_MAX_SERVICE": cap.services,
        "KM_MAX_ENDPOINT": cap.endpoints,
        "KM_MAX_BACKEND": cap.backends,
        "KM_MAX_MANAGE": cap.manage,
        "KM_MAX_SOCK": cap.sockets,
        "KM_MAX_NAMES": cap.names(),
    }
    text = "".join(f"#define {k} {v}\n" for k, v in defs.items())
    seen: set[str] = set()
    return text + "".join(expand_includes(BPF_DIR / src, seen) for src in SOURCES)


@dataclass
class Loaded:
    """A compiled module: the bcc object, its loaded programs and its maps."""

    bpf: Any
    functions: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, MapIO] = field(default_factory=dict)

    def attach(self, cgroup_fd: int) -> None:
        """Attach every program (flags 0: replaces our previous program of each type in place)."""
        for name, attach_type in ATTACH_TYPES.items():
            bpfsys.prog_attach(cgroup_fd, self.functions[name].fd, attach_type)

    def prog_ids(self) -> dict[str, int]:
        """Kernel program id of each loaded program (what bpftool shows)."""
        return {name: bpfsys.obj_id(fn.fd) for name, fn in self.functions.items()}

    def cleanup(self) -> None:
        """Release fds; attachments and pins stay (restart semantics)."""
        try:
            self.bpf.cleanup()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass


def compile_programs(gen_dir: Path, cap: Capacity) -> Loaded:
    """In-process compile (the loader child, and benchmarks of the reconciler alone)."""
    return _compile(gen_dir, cap)


def _compile(gen_dir: Path, cap: Capacity) -> Loaded:
    """Compile and load every program; maps are created and pinned under gen_dir, or reused."""
    ensure_kernel_source()
    from bcc import BPF

    gen_dir.mkdir(parents=True, exist_ok=True)
    bpf = BPF(text=build_text(gen_dir, cap).encode(), cflags=["-Wno-unused-value", "-Wno-pointer-sign"])
    loaded = Loaded(bpf)
    for name, (key_t, val_t) in layout.MAP_LAYOUTS.items():
        table = bpf[layout.MAP_SYMBOLS[name].encode()]
        ksz, vsz = ct.sizeof(table.Key), ct.sizeof(table.Leaf)
        if (ksz, vsz) != (ct.sizeof(key_t), ct.sizeof(val_t)):
            raise RuntimeError(f"map {name}: C layout {ksz}/{vsz} bytes != ctypes layout "
                               f"{ct.sizeof(key_t)}/{ct.sizeof(val_t)}; fix daemon/dataplane/layout.py")
        info = bpfsys.map_info(table.map_fd)
        loaded.maps[name] = MapIO(name, table.map_fd, ksz, vsz, info["max_entries"])
    for name, attach_type in SOCK_ADDR_PROGRAMS.items():
        loaded.functions[name] = bpf.load_func(name.encode(), BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
    for name in SOCKOPS_PROGRAMS:
        loaded.functions[name] = bpf.load_func(name.encode(), BPF.SOCK_OPS)
    for name, sockhash in SK_MSG_PROGRAMS.items():
        fn = loaded.functions[name] = bpf.load_func(name.encode(), BPF.SK_MSG)
        # flags 0 on a map: replaces the previous verdict program; sockets already in the map
        # keep the program they were added with (their own reference)
        from bcc.libbcc import lib  # bcc 0.26's Table() does not know sockhash maps

        bpfsys.prog_attach(lib.bpf_table_fd(bpf.module, sockhash.encode()), fn.fd, bpfsys.SK_MSG_VERDICT)
    # tc (tcx) program of daemon/authz: loaded here, attached per pod netns by daemon/authz/attach.py
    loaded.functions["authz"] = bpf.load_func(b"authz", BPF.SCHED_CLS)
    walk = bpf.load_func(b"authz_walk", BPF.SCHED_CLS)
    bpf[b"km_authz_jmp"][ct.c_int(0)] = ct.c_int(walk.fd)  # pinned: outlives this process
    return loaded


# ------------------------------------------------------------------ child process
@dataclass
class Programs:
    """What the loader child handed over: loaded (not yet attached) programs, the ring buffer,
    and the pinned maps opened by path. All fds belong to this process."""

    prog_fds: dict[str, int]
    ring_fd: int
    maps: dict[str, MapIO]

    def attach(self, cgroup_fd: int, sockops: bool = True) -> None:
        """Attach the connect/getpeername programs and, when `sockops`, the sockops program
        (flags 0: replaces our previous program of each type in place)."""
        for name, attach_type in ATTACH_TYPES.items():
            if sockops or name not in SOCKOPS_PROGRAMS:
                bpfsys.prog_attach(cgroup_fd, self.prog_fds[name], attach_type)

    def attach_one(self, cgroup_fd: int, name: str) -> None:
        bpfsys.prog_attach(cgroup_fd, self.prog_fds[name], ATTACH_TYPES[name])

    def prog_ids(self) -> dict[str, int]:
        return {name: bpfsys.obj_id(fd) for name, fd in self.prog_fds.items()}

    def cleanup(self) -> None:
        """Close fds; attachments and pins stay (restart semantics)."""
        for m in self.maps.values():
            m.close()
        for fd in [*self.prog_fds.values(), self.ring_fd]:
            if fd >= 0:
                os.close(fd)
        self.prog_fds = {}
        self.ring_fd = -1


def load_in_child(gen_dir: Path, cap: Capacity, timeout: float = 300.0) -> Programs:
    """Compile and load in a child process; maps are created and pinned under gen_dir, or reused."""
    ensure_kernel_source()
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "daemon.dataplane.loader", "--gen-dir", str(gen_dir),
           "--capacity", json.dumps(astuple(cap)), "--fd", str(child.fileno())]
    try:
        with child:
            proc = subprocess.run(cmd, pass_fds=(child.fileno(),), env=env, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            raise RuntimeError(f"BPF compile/load failed (exit {proc.returncode}): "
                               f"{' | '.join(lines[-3:])[-600:]}")
        parent.settimeout(5)
        msg, fds, flags, _ = socket.recv_fds(parent, 65536, 16)
    finally:
        parent.close()
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise RuntimeError("BPF loader: file descriptors were truncated in transit")
    names = json.loads(msg)["fds"]
    by_name = dict(zip(names, fds, strict=True))
    ring_fd = by_name.pop("km_events")
    maps: dict[str, MapIO] = {}
    try:
        for name in layout.MAP_LAYOUTS:
            maps[name] = MapIO.open_pinned(name, str(gen_dir / name))
    except OSError:
        for m in maps.values():
            m.close()
        for fd in fds:
            os.close(fd)
        raise
    return Programs(by_name, ring_fd, maps)


def _child_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m daemon.dataplane.loader")
    ap.add_argument("--gen-dir", required=True)
    ap.add_argument("--capacity", required=True, help="JSON list of Capacity fields")
    ap.add_argument("--fd", type=int, required=True, help="unix socket to send the fds over")
    a = ap.parse_args(argv)
    cap = Capacity(*json.loads(a.capacity))
    loaded = _compile(Path(a.gen_dir), cap)
    loaded.maps["layout"].update(layout.U32.pack(0), bytes(layout.LayoutVal(layout.LAYOUT_VERSION)))
    names = [*loaded.functions, "km_events"]
    fds = [fn.fd for fn in loaded.functions.values()] + [loaded.bpf[b"km_events"].map_fd]
    with socket.socket(fileno=a.fd) as sock:
        socket.send_fds(sock, [json.dumps({"fds": names}).encode()], fds)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main())
