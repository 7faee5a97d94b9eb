"""Compile bpf/*.c with bcc in one module (so every program shares the pinned maps) and attach.

bcc can only rewrite map method calls (``km_frontend.lookup(...)``) in the main source text,
never in ``#include``d files, so local ``#include "x.h"`` lines are expanded here, each header
once, before the text reaches clang.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.dataplane import bpfsys, layout
from daemon.dataplane.mapio import MapIO
from daemon.dataplane.types import Capacity

REPO = Path(__file__).resolve().parents[2]
BPF_DIR = REPO / "bpf"
SOURCES = ("connect4.c", "connect6.c", "getpeername.c", "sockops.c")
CGROUP2_MAGIC = 0x63677270

# program name -> attach type; all attach to the same cgroup
SOCK_ADDR_PROGRAMS = {
    "connect4": bpfsys.CGROUP_INET4_CONNECT,
    "connect6": bpfsys.CGROUP_INET6_CONNECT,
    "getpeername4": bpfsys.CGROUP_INET4_GETPEERNAME,
    "getpeername6": bpfsys.CGROUP_INET6_GETPEERNAME,
}
SOCKOPS_PROGRAMS = {"sockops": bpfsys.CGROUP_SOCK_OPS}
ATTACH_TYPES = {**SOCK_ADDR_PROGRAMS, **SOCKOPS_PROGRAMS}


def ensure_kernel_source() -> None:
    """bcc needs kernel headers: fall back to the merged tree `make setup` builds."""
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return
    if Path(f"/lib/modules/{os.uname().release}/build").exists():
        return
    os.environ["BCC_KERNEL_SOURCE"] = str(REPO / ".build" / "kernel-src")


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
        from bcc import BPF

        for name, attach_type in ATTACH_TYPES.items():
            BPF.attach_func(self.functions[name], cgroup_fd, attach_type)

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
    return loaded
