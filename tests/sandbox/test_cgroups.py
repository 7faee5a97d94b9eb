"""sandbox.cgroups.remove_cgroup_tree: the one cleanup every area uses for its cgroups."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox.cgroups import own_cgroup, remove_cgroup_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for cgroups")


def test_removes_nested_cgroups_and_kills_their_processes(test_cgroup: Path, run_prefix: str) -> None:
    assert own_cgroup() == test_cgroup / "runner"  # pytest runs in the run's leaf, outside the tree removed
    top = test_cgroup / f"{run_prefix}-rmtree"
    leaves = [top / "a", top / "b" / "c"]  # processes only in leaves (cgroup v2 rule)
    procs = []
    for leaf in leaves:
        leaf.mkdir(parents=True)
        p = subprocess.Popen(["sleep", "60"])
        (leaf / "cgroup.procs").write_text(str(p.pid))
        procs.append(p)
    remove_cgroup_tree(top)
    assert not top.exists()
    assert [p.wait(timeout=5) for p in procs] == [-9, -9]  # SIGKILLed
    remove_cgroup_tree(top)  # idempotent: a missing tree is fine
