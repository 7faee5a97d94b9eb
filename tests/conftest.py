"""Session-wide fixtures shared by every test area.

Safety (DEVELOPERS.md): every test process runs under a dedicated, uniquely named child
cgroup of the cgroup v2 hierarchy; BPF programs are attached there, never at the root.
Names created by tests start with ``run_prefix`` so leftovers are identifiable.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CGROUP2_ROOT = Path(os.environ.get("KMESH_CGROUP2_ROOT", "/sys/fs/cgroup/unified"))

os.environ.setdefault("BCC_KERNEL_SOURCE", str(REPO / ".build" / "kernel-src"))

# Short, unique per run: fits in 15-char interface names with a suffix ("kt1a2b3c-v0").
RUN_PREFIX = "kt" + secrets.token_hex(3)


@pytest.fixture(scope="session")
def run_prefix() -> str:
    """Unique name prefix of this test run (netns, veths, cgroups, pins)."""
    return RUN_PREFIX


def _own_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP2_ROOT / line[3:].lstrip("/")
    return CGROUP2_ROOT


def _rm_cgroup_tree(path: Path) -> None:
    """Remove a cgroup and its children, killing processes left in them (all ours)."""
    if not path.exists():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _rm_cgroup_tree(child)
    for _ in range(50):
        pids = [int(p) for p in (path / "cgroup.procs").read_text().split()] if path.exists() else []
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    try:
        path.rmdir()
    except (FileNotFoundError, OSError):
        pass


@pytest.fixture(scope="session", autouse=True)
def test_cgroup() -> Iterator[Path]:
    """A dedicated cgroup v2 directory for this run; pytest itself is moved into it.

    Children of pytest (daemons, servers, clients) inherit it, so programs attached here
    see all test traffic and nothing else on the machine.
    """
    if os.geteuid() != 0 or not (CGROUP2_ROOT / "cgroup.procs").exists():
        yield _own_cgroup()
        return
    original = _own_cgroup()
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
        _rm_cgroup_tree(path)
