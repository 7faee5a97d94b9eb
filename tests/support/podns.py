"""Enter a test pod: join its cgroup v2 directory and its network namespace.

Why a module of its own: both in-netns scripts (netclient.py, netserver.py) must do this
before opening any socket, and the cgroup must be joined first so the BPF programs attached to
that cgroup see the process's connect() calls. Imported as a sibling module when the scripts run
by path (their directory is then sys.path[0]).
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNET = 0x40000000


def enter(netns: str, cgroup: str = "") -> None:
    """Move this process into `cgroup` (when given), then into the netns at path `netns`."""
    if cgroup:
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    fd = os.open(netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        sys.exit(f"setns {netns} failed")
