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

from sandbox.cgroups import Cgroup2Missing, cgroup2_root, enter_leaf, own_cgroup, remove_cgroup_tree

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("BCC_KERNEL_SOURCE", str(REPO / ".build" / "kernel-src"))
# Sandboxes started by tests run the daemon pod as a plain process whether or not `make image` has
# built the image (deterministic suite); tests/packaging opts into podman explicitly.
os.environ.setdefault("KMESH_SANDBOX_DAEMON_RUNTIME", "process")

# Short, unique per run: fits in 15-char interface names with a suffix ("kt1a2b3c-v0").
# KMESH_TEST_RUN_PREFIX: set by tests/test_portability.py for the pytest it runs inside namespaces.
RUN_PREFIX = os.environ.get("KMESH_TEST_RUN_PREFIX") or "kt" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """Unique name prefix of this test run (netns, veths, cgroups, pins)."""
    return RUN_PREFIX


@pytest.fixture(scope="session", autouse=True)
def test_cgroup() -> Iterator[Path]:
    """A dedicated cgroup v2 directory for this run, under the detected hierarchy (any layout).

    pytest itself moves into its leaf ``<run>/runner`` (cgroup v2 holds processes only in leaves
    once controllers are on), so its children (daemons, servers, clients) are inside the run's
    cgroup: programs attached here see all test traffic and nothing else on the machine.
    """
    try:
        root = cgroup2_root()
    except Cgroup2Missing as e:
        if os.geteuid() == 0:
            pytest.exit(f"tests: {e}", returncode=2)
        yield Path("/nonexistent-cgroup2")  # the tests that need one skip without root
        return
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        yield own_cgroup(root)
        return
    original = own_cgroup(root)
    path = root / f"kmesh-test-{RUN_PREFIX}"
    path.mkdir(exist_ok=True)
    enter_leaf(path)
    try:
        yield path
    finally:
        try:
            (original / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            (root / "cgroup.procs").write_text(str(os.getpid()))
        remove_cgroup_tree(path)
