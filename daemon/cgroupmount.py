"""Where cgroup v2 is on this machine, and mounting it where the DaemonSet expects it.

Finding it (``cgroup2_root``): the one place every part of the project asks. Hosts differ: a
pure v2 host (Debian 12, Ubuntu 22.04+, most Kubernetes nodes) has it at /sys/fs/cgroup, a
hybrid host under /sys/fs/cgroup/unified, a container wherever its runtime put it. So nothing
hard-codes a path: the first ``cgroup2`` mount in /proc/self/mountinfo wins, and
``KMESH_CGROUP2_ROOT`` overrides it.

Mounting it (``ensure_cgroup2``, /mnt/kmesh_cgroup2): in a cluster the daemon attaches its
connect programs at the root of the node's cgroup v2 hierarchy, as Kmesh does. Nodes differ in
where (or whether) it is mounted, so the daemon mounts one at a stable path itself. This runs
only when the operator passed ``--i-know-this-is-the-node-root``; the sandbox and tests always
use a child cgroup instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from collections.abc import Mapping
from pathlib import Path

CGROUP2_SUPER_MAGIC = 0x63677270
ROOT_ENV = "KMESH_CGROUP2_ROOT"
MOUNTINFO = Path("/proc/self/mountinfo")


class Cgroup2Missing(OSError):
    """No cgroup v2 hierarchy is mounted (or the override is not one); the message says what to do."""


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup2_mounts(mountinfo: Path = MOUNTINFO) -> list[tuple[Path, str]]:
    """(mount point, path of the mount's root inside the hierarchy) of each cgroup2 mount, in order."""
    found = []
    for line in mountinfo.read_text().splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split(" ")
        if sep and len(fields) > 4 and right.split(" ", 1)[0] == "cgroup2":
            found.append((Path(_unescape(fields[4])), _unescape(fields[3])))
    return found


def cgroup2_root(environ: Mapping[str, str] | None = None, mountinfo: Path = MOUNTINFO) -> Path:
    """The cgroup v2 hierarchy this process sees: $KMESH_CGROUP2_ROOT, else the first cgroup2 mount.

    Raises Cgroup2Missing with a one-line fix when there is none.
    """
    env = os.environ if environ is None else environ
    override = env.get(ROOT_ENV)
    if override:
        path = Path(override)
        if not is_cgroup2(path):
            raise Cgroup2Missing(f"{ROOT_ENV}={override} is not a cgroup v2 directory; "
                                 "unset it or point it at a cgroup2 mount")
        return path
    mounts = cgroup2_mounts(mountinfo)
    if not mounts:
        raise Cgroup2Missing("no cgroup v2 hierarchy is mounted: mount one (as root: "
                             "mkdir -p /mnt/cgroup2 && mount -t cgroup2 none /mnt/cgroup2) "
                             f"or set {ROOT_ENV} to a cgroup2 mount")
    return mounts[0][0]


def own_cgroup(root: Path | None = None, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Path:
    """This process's cgroup v2 directory under ``root`` (default: ``cgroup2_root()``).

    /proc/self/cgroup gives the path inside the hierarchy; a mount whose root is not the
    hierarchy's root (a container's view) is accounted for.
    """
    root = cgroup2_root() if root is None else root
    own = "/"
    for line in proc_cgroup.read_text().splitlines():
        if line.startswith("0::"):
            own = line[3:]
    mount_root = next((r for m, r in cgroup2_mounts() if m == root), "/")
    rel = Path(own).relative_to(mount_root) if Path(own).is_relative_to(mount_root) else Path(own.lstrip("/"))
    return root / rel


def is_cgroup2(path: Path) -> bool:
    """True when ``path`` lives on a cgroup v2 filesystem (statfs magic)."""

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == CGROUP2_SUPER_MAGIC


def ensure_cgroup2(path: Path) -> bool:
    """Make ``path`` a cgroup v2 mount. Returns True if it mounted one, False if already there.

    Raises OSError with the reason when the mount fails (not root, no cgroup2 support).
    """
    if path.exists() and is_cgroup2(path):
        return False
    path.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(b"none", os.fsencode(str(path)), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount cgroup2 at {path}: {os.strerror(err)}")
    return True
