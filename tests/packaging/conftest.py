"""Fixtures of the packaging tests: the daemon image (built once per machine, cached by content
hash under .build/image by scripts/image.sh) and podman with the project's containers.conf."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO / "sandbox" / "kubelet" / "containers.conf"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=PODMAN_ENV, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}: {r.stderr.strip()}")
    return r


def podman_unusable() -> str | None:
    """Why podman cannot run containers here, or None."""
    if os.geteuid() != 0:
        return "podman containers need root here (rootless podman is not set up)"
    try:
        r = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except FileNotFoundError:
        return "podman is not installed (make setup installs podman, runc and debootstrap)"
    if r.returncode != 0:
        return f"podman cannot run on this machine: {r.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="session", autouse=True)
def _no_podman_cgroups_left() -> Iterator[None]:
    """podman build / run leave empty libpod_parent cgroups behind: remove them after the tests."""
    yield
    from sandbox.kubelet.podman import remove_default_parent_cgroups

    remove_default_parent_cgroups()


@pytest.fixture(scope="session")
def daemon_image() -> str:
    """`make image`'s image reference (built now if the sources changed since the last build)."""
    reason = podman_unusable()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(REPO / "scripts" / "image.sh")], capture_output=True, text=True,
                       timeout=1200, cwd=REPO)
    assert r.returncode == 0, f"scripts/image.sh failed:\n{r.stderr[-3000:]}"
    (REPO / ".build" / "image" / "last-test-build-seconds").write_text(f"{time.monotonic() - t0:.1f}\n")
    ref = r.stdout.strip().splitlines()[-1]
    assert ref.startswith("localhost/kmesh-daemon:"), r.stdout
    return ref
