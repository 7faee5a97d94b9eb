"""The in-cluster cgroup2 mount, exercised in a private mount namespace (nothing leaks out)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.cgroupmount import cgroup2_root, is_cgroup2

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount namespaces")


def test_detects_cgroup2_and_plain_dirs(tmp_path: Path) -> None:
    assert is_cgroup2(cgroup2_root())
    assert not is_cgroup2(tmp_path)
    assert not is_cgroup2(tmp_path / "missing")


def test_mounts_once_in_a_private_mount_namespace(tmp_path: Path) -> None:
    target = tmp_path / "kmesh_cgroup2"
    script = (
        "import sys; from pathlib import Path; from daemon.cgroupmount import ensure_cgroup2, is_cgroup2\n"
        f"p = Path({str(target)!r})\n"
        "first = ensure_cgroup2(p); second = ensure_cgroup2(p)\n"
        "print(first, second, is_cgroup2(p))\n"
    )
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=30, check=True,
    )
    assert out.stdout.split() == ["True", "False", "True"]
    # The mount lived only in the child's namespace.
    assert not is_cgroup2(target)
