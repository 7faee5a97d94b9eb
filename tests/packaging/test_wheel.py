"""The project as users get it: sdist -> wheel -> a fresh venv outside the checkout.

The wheel is built from the sdist (so the sdist is complete too), installed into a new venv in a
temporary directory (``--system-site-packages`` only so Debian's bcc is importable), and every
command runs from there with the checkout out of reach (cwd elsewhere, no PYTHONPATH): version,
``install --dry-run -o yaml`` (validated against the Kubernetes schema, and identical to the
checkout's rendering), ``kmesh-daemon --help``/``version`` and a ``sandbox up``/``down`` cycle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from daemon.version import version
from tests.support.kubectl import kubectl_path

REPO = Path(__file__).resolve().parents[2]
REQUIRED = [
    "kmesh_assets/manifests/kmesh/daemonset.yaml",
    "kmesh_assets/manifests/kmesh/rbac.yaml",
    "kmesh_assets/manifests/envoyfilters/waypoint.yaml",
    "kmesh_assets/manifests/samples/netutils.yaml",
    "kmesh_assets/manifests/samples/fortio/fortio-route.yaml",
    "kmesh_assets/bpf/connect4.c",
    "kmesh_assets/bpf/include/km_maps.h",
    "daemon/xds/gen/istio/workload/workload_pb2.py",
    "daemon/assets.py",
    "sandbox/kubelet/containers.conf",
    "sandbox/apiserver/README.md",
]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = _run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(REPO)],
        REPO,
        dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    sdist = next(out.glob("kmesh_py-*.tar.gz"))
    r = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(sdist),
        ],
        out,
        dict(os.environ),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return next(out.glob("kmesh_py-*.whl"))


def test_wheel_carries_what_runs(dist: Path) -> None:
    names = set(zipfile.ZipFile(dist).namelist())
    required = list(REQUIRED)
    if (REPO / "waypoint" / "kmesh_tlv" / "kmesh_tlv.c").exists():
        required.append("waypoint/kmesh_tlv/kmesh_tlv.c")
    for sub in ("manifests", "bpf"):  # every file of those trees, not just the ones named above
        required += [
            f"kmesh_assets/{p.relative_to(REPO)}"
            for p in (REPO / sub).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    missing = sorted(set(required) - names)
    assert not missing, f"wheel lacks {missing}"
    assert dist.name.startswith(f"kmesh_py-{version()}-")


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """(venv, env, cwd): a fresh venv with the wheel, and an env/cwd that cannot see the checkout."""
    base = tmp_path_factory.mktemp("user")
    v = base / "venv"
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(v)], check=True, timeout=120
    )
    env = {
        k: val
        for k, val in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "KMESH_MANIFESTS_DIR")
    }
    env["PATH"] = f"{v / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
    env["HOME"] = str(base)
    r = _run([str(v / "bin" / "pip"), "install", "-q", str(dist)], base, env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    yield v, env, base


def test_installed_code_comes_from_the_venv(venv: tuple[Path, dict[str, str], Path]) -> None:
    v, env, cwd = venv
    r = _run(
        [
            str(v / "bin" / "python"),
            "-c",
            "import daemon.assets as a, kmeshctl;"
            "print(kmeshctl.__file__); print(a.manifests_dir()); print(a.bpf_dir())",
        ],
        cwd,
        env,
    )
    assert r.returncode == 0, r.stderr
    for line in r.stdout.split():
        assert line.startswith(str(v)), r.stdout


def test_versions(venv: tuple[Path, dict[str, str], Path]) -> None:
    v, env, cwd = venv
    r = _run([str(v / "bin" / "kmeshctl"), "version"], cwd, {**env, "KUBECONFIG": "/nonexistent"})
    assert r.stdout.startswith(f"client version: v{version()}"), r.stdout + r.stderr
    r = _run([str(v / "bin" / "kmesh-daemon"), "version"], cwd, env)
    assert r.returncode == 0 and json.loads(r.stdout)["gitVersion"] == f"v{version()}", r.stderr
    r = _run([str(v / "bin" / "kmesh-daemon"), "--help"], cwd, env)
    assert r.returncode == 0 and "--cgroup-root" in r.stdout and "--node-wide" in r.stdout, r.stderr


def test_install_dry_run_yaml_is_valid_and_complete(venv: tuple[Path, dict[str, str], Path]) -> None:
    v, env, cwd = venv
    args = [
        "install",
        "--dry-run",
        "-o",
        "yaml",
        "--xds",
        "istiod.istio-system.svc:15012",
        "--cluster-id",
        "Kubernetes",
    ]
    r = _run([str(v / "bin" / "kmeshctl"), *args], cwd, env)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and "DaemonSet" in kinds and kinds.count("EnvoyFilter") >= 1, kinds
    for obj in docs:
        if obj["kind"] == "EnvoyFilter":
            assert obj["apiVersion"].startswith("networking.istio.io/"), obj["apiVersion"]
            continue
        kubernetes_validate.validate(obj, "1.30", strict=True)
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    assert (
        ds["spec"]["template"]["spec"]["containers"][0]["image"]
        == f"ghcr.io/kmesh-py/kmesh-daemon:{version()}"
    )
    # Exactly what the checkout renders: the packaged templates are the repository's.
    here = _run([sys.executable, "-m", "kmeshctl.main", *args], REPO, dict(os.environ))
    assert here.stdout == r.stdout


def test_sandbox_up_down_from_the_wheel(venv: tuple[Path, dict[str, str], Path]) -> None:
    v, env, cwd = venv
    kmeshctl = str(v / "bin" / "kmeshctl")
    d = cwd / "sandbox"
    env = {**env, "KMESH_SANDBOX_DIR": str(d), "KMESH_SANDBOX_DAEMON_RUNTIME": "process"}
    # Free xDS ports (--xds-ports auto): no clash with a demo on istiod's 15012/15010.
    up = _run([kmeshctl, "sandbox", "up", "--xds-ports", "auto"], cwd, env, timeout=180)
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        assert up.stdout.strip() == f"export KUBECONFIG={d / 'kubeconfig'}"
        st = json.loads(_run([kmeshctl, "sandbox", "status", "-o", "json"], cwd, env).stdout)
        assert st["running"] and all(c["ready"] for c in st["components"].values()), st
        for c in st["components"].values():  # every component runs the venv's code
            cmdline = Path(f"/proc/{c['pid']}/cmdline").read_bytes().split(b"\0")
            assert cmdline[0].decode().startswith(str(v)), cmdline
        kubectl = subprocess.run(
            [kubectl_path(), "get", "nodes", "-o", "name"],
            capture_output=True,
            text=True,
            env={**env, "KUBECONFIG": str(d / "kubeconfig")},
            timeout=30,
        )
        assert kubectl.returncode == 0 and kubectl.stdout.startswith("node/"), kubectl.stderr
        cgroup = Path(st["cgroupRoot"])
    finally:
        down = _run([kmeshctl, "sandbox", "down"], cwd, env, timeout=120)
    assert down.returncode == 0 and "sandbox is down" in down.stderr, down.stderr
    assert not cgroup.exists()
    netns = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    assert not [n for n in netns if n.startswith(st["prefix"])]
