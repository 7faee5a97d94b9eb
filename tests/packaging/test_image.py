"""The daemon image `make image` builds: it reports its version and its daemon starts in a podman
container against a child cgroup and a private bpffs, attaches there, and answers on admin /status.

Skipped (with the reason) only when podman cannot run containers on the machine.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.cgroupmount import cgroup2_root
from daemon.version import version
from sandbox.cgroups import remove_cgroup_tree
from sandbox.kubelet.podman import remove_v1_cgroups
from tests.packaging.conftest import podman

# The first test to need the image may build it (fresh machine: ~3-5 min under load).
pytestmark = [pytest.mark.kernel, pytest.mark.timeout(1200)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_image_reports_the_project_version(daemon_image: str) -> None:
    r = podman("run", "--rm", "--network", "host", daemon_image, "version", timeout=120)
    info = json.loads(r.stdout)
    assert info["gitVersion"] == f"v{version()}"


def test_image_carries_the_xds_decoder_helper(daemon_image: str) -> None:
    """scripts/image.sh compiles daemon/xds/wiresplit.c for the image (which has no Python
    headers): the daemon there loads it instead of falling back to the Python decoder."""
    code = "from daemon.xds import native; print(native.load() is not None)"
    r = podman("run", "--rm", "--network", "host", "--entrypoint", "/opt/kmesh/venv/bin/python",
               daemon_image, "-c", code, timeout=120)
    assert r.stdout.strip() == "True", r.stderr[-500:]


@pytest.fixture
def child_cgroup(test_cgroup: Path) -> Iterator[Path]:
    path = test_cgroup / f"img-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        remove_v1_cgroups(path)
        remove_cgroup_tree(path)
        remove_v1_cgroups(test_cgroup)  # runc also made the parent path in every v1 hierarchy


@pytest.fixture
def private_bpffs(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "bpffs"
    d.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def _status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def test_daemon_runs_in_the_image(daemon_image: str, child_cgroup: Path, private_bpffs: Path) -> None:
    """As the DaemonSet runs it: privileged, host network, the node's cgroup2 at /mnt/kmesh_cgroup2
    (here a child cgroup), /sys/fs/bpf (here a private bpffs), KMESH_CGROUP_ROOT and --node-wide."""
    name = f"kmesh-test-{secrets.token_hex(4)}"
    admin, metrics = _free_port(), _free_port()
    parent = "/" + str(child_cgroup.relative_to(cgroup2_root()))
    try:
        podman(
            "run",
            "-d",
            "--name",
            name,
            "--privileged",
            "--network",
            "host",
            "--cgroupns",
            "private",
            "--cgroup-parent",
            f"{parent}/pod",
            "-v",
            f"{child_cgroup}:/mnt/kmesh_cgroup2",
            "-v",
            f"{private_bpffs}:/sys/fs/bpf",
            "-e",
            "KMESH_CGROUP_ROOT=/mnt/kmesh_cgroup2",
            daemon_image,
            "--node-wide",
            "--plaintext",
            "--xds-address",
            "127.0.0.1:1",
            "--no-enroll",
            "--admin-addr",
            f"127.0.0.1:{admin}",
            "--metrics-addr",
            f"127.0.0.1:{metrics}",
        )
        deadline = time.monotonic() + 120
        st: dict | None = None
        while time.monotonic() < deadline:
            st = _status(admin)
            if st and "data plane not loaded" not in st.get("problems", []):
                break
            if (
                podman("inspect", "--format", "{{.State.Running}}", name, check=False).stdout.strip()
                != "true"
            ):
                break
            time.sleep(0.5)
        logs = podman("logs", name, check=False).stdout[-3000:]
        assert st is not None, f"admin /status never answered; container log:\n{logs}"
        assert "data plane not loaded" not in st.get("problems", []), logs
        assert st["cgroup"] == "/mnt/kmesh_cgroup2"
        # Attached to the child cgroup (the node root as the container sees it), pinned in the private bpffs.
        shown = subprocess.run(
            ["bpftool", "cgroup", "show", str(child_cgroup)], capture_output=True, text=True
        )
        assert "connect4" in shown.stdout and "sockops" in shown.stdout, shown.stdout + shown.stderr
        assert any((private_bpffs / "kmesh").iterdir())
        # The daemon process itself is inside the subtree it redirects (its control connect must be).
        pid = podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
        own = next(
            line[3:]
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
            if line.startswith("0::")
        )
        assert own.startswith(parent + "/pod/"), own
    finally:
        podman("rm", "-f", "-t", "2", name, check=False)
    assert podman("ps", "-a", "-q", "--filter", f"name={name}", check=False).stdout.strip() == ""
