"""Session-wide fixtures shared by every test area.

Safety (DEVELOPERS.md): every test process runs under a dedicated, uniquely named child
cgroup of the cgroup v2 hierarchy; BPF programs are attached there, never at the root.
Names created by tests start with ``run_prefix`` so leftovers are identifiable.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.cgroups import CGROUP2_ROOT, own_cgroup, remove_cgroup_tree

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("BCC_KERNEL_SOURCE", str(REPO / ".build" / "kernel-src"))
# Sandboxes started by tests run the daemon pod as a plain process whether or not `make image` has
# built the image (deterministic suite); tests/packaging opts into podman explicitly.
os.environ.setdefault("KMESH_SANDBOX_DAEMON_RUNTIME", "process")

# Short, unique per run: fits in 15-char interface names with a suffix ("kt1a2b3c-v0").
RUN_PREFIX = "kt" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """Unique name prefix of this test run (netns, veths, cgroups, pins)."""
    return RUN_PREFIX


@pytest.fixture(scope="session", autouse=True)
def test_cgroup() -> Iterator[Path]:
    """A dedicated cgroup v2 directory for this run; pytest itself is moved into it.

    Children of pytest (daemons, servers, clients) inherit it, so programs attached here
    see all test traffic and nothing else on the machine.
    """
    if os.geteuid() != 0 or not (CGROUP2_ROOT / "cgroup.procs").exists():
        yield own_cgroup(CGROUP2_ROOT)
        return
    original = own_cgroup(CGROUP2_ROOT)
    path = CGROUP2_ROOT / f"kmesh-test-{RUN_PREFIX}"
    path.mkdir(exist_ok=True)
    (path / "cgroup.procs").write_text(str(os.getpid()))
    try:
        yield path
    finally:
        try:
            (original / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            (CGROUP2_ROOT / "cgroup.procs").write_text(str(os.getpid()))
        remove_cgroup_tree(path)
