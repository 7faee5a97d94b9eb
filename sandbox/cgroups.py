"""cgroup v2 helpers shared by the sandbox node, the benchmarks and the test fixtures.

Why one place: every throw-away cgroup we make (a pod, a test run, a benchmark) is removed the
same way, and getting it wrong leaves processes or directories behind on a shared machine.
Where the hierarchy is mounted comes from ``daemon.cgroupmount.cgroup2_root`` (never a fixed
path): /sys/fs/cgroup on a pure v2 host, elsewhere on a hybrid one.

cgroup v2's no-internal-processes rule: a cgroup that enables controllers for its children
may hold no processes (the hierarchy root excepted). A run or a node cgroup has children (pods,
areas), so the processes of a run go into a leaf of it (``enter_leaf``), never the run cgroup
itself; that stays valid whatever controllers a host turns on.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from daemon.cgroupmount import Cgroup2Missing, cgroup2_root, own_cgroup

__all__ = ["Cgroup2Missing", "cgroup2_root", "own_cgroup", "enter_leaf", "remove_cgroup_tree"]

LEAF = "runner"


def enter_leaf(parent: Path, name: str = LEAF, pid: int | None = None) -> Path:
    """Move ``pid`` (default: this process) into the leaf ``parent/name``, created if needed.

    ``parent`` itself stays free of processes, so it may have child cgroups with controllers.
    """
    leaf = parent / name
    leaf.mkdir(parents=True, exist_ok=True)
    (leaf / "cgroup.procs").write_text(str(pid or os.getpid()))
    return leaf


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
