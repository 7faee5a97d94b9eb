"""pytest plugin for the pure cgroup v2 slice (tests/test_portability.py): the process layout.

cgroup v2 lets no cgroup below the root hold processes while it enables controllers for
children; on a host that enables them (systemd does) writing a pid there fails with EBUSY. A
host here may offer no controller to enable (see purev2.py), so this checks the layout itself,
after every test while its fixtures are still up: a cgroup under /sys/fs/cgroup that has child
cgroups holds no processes. That keeps working whatever controllers a host turns on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path("/sys/fs/cgroup")


def internal_processes(root: Path = ROOT) -> list[str]:
    """Cgroups below ``root`` that have both processes and child cgroups."""
    bad = []
    for procs_file in root.rglob("cgroup.procs"):
        d = procs_file.parent
        if d == root:
            continue
        try:
            pids = procs_file.read_text().split()
            children = [c.name for c in d.iterdir() if c.is_dir()]
        except OSError:  # removed while we looked
            continue
        if pids and children:
            bad.append(f"{d} holds pids {' '.join(pids)} and has child cgroups {children}")
    return bad


@pytest.fixture(autouse=True)
def _no_internal_processes() -> Iterator[None]:
    yield
    bad = internal_processes()
    assert not bad, "cgroup v2 no-internal-processes rule broken: " + "; ".join(bad)
