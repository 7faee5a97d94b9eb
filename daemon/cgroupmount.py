"""Mount the node's cgroup v2 hierarchy where the DaemonSet expects it (/mnt/kmesh_cgroup2).

Why: in a cluster the daemon attaches its connect programs at the root of the node's cgroup v2
hierarchy, as Kmesh does. Nodes on a hybrid or v1 layout have no cgroup2 mount at a stable
path, so the daemon mounts one itself. This runs only when the operator passed
``--i-know-this-is-the-node-root``; the sandbox and tests always use a child cgroup instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

CGROUP2_SUPER_MAGIC = 0x63677270


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
