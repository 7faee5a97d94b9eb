"""cgroup v2 helpers shared by the sandbox node, the benchmarks and the test fixtures.

Why one place: every throw-away cgroup we make (a pod, a test run, a benchmark) is removed the
same way, and getting it wrong leaves processes or directories behind on a shared machine.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CGROUP2_ROOT = Path(os.environ.get("KMESH_CGROUP2_ROOT", "/sys/fs/cgroup/unified"))


def own_cgroup(root: Path = CGROUP2_ROOT) -> Path:
    """This process's cgroup v2 directory under ``root``."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return root


def remove_cgroup_tree(path: Path) -> None:
    """Kill every process in a cgroup subtree (only ours live there) and remove the directories.

    Children first; ``cgroup.kill`` where the kernel has it, then SIGKILL by pid for the rest.
    The calling process is never killed. Idempotent: a missing path is fine.
    """
    if not path.exists():
        return
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [path]
    for d in dirs:
        kill = d / "cgroup.kill"
        if kill.exists():
            try:
                kill.write_text("1")
            except OSError:
                pass
    for d in dirs:
        for _ in range(100):
            try:
                procs = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except OSError:
                procs = []
            procs = [p for p in procs if p != os.getpid()]
            if not procs:
                break
            for pid in procs:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for _ in range(20):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
