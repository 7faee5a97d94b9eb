"""The project on the hosts users have: a pure cgroup v2 layout and no kubectl of the machine's.

Why: this machine has a hybrid layout (cgroup v2 under /sys/fs/cgroup's ``unified`` directory)
and ships a kubectl; a standard Debian 12 / Ubuntu host or a Kubernetes node has cgroup v2 at
/sys/fs/cgroup and maybe no kubectl at all. A representative slice of the suite (kernel load
balancing through network namespaces, daemon enrolment, the sandbox walkthrough that `make demo`
follows, cgroup cleanup) runs again in a pytest of its own inside tests/support/purev2.py's
namespaces: /sys/fs/cgroup a fresh cgroup2 mount with controllers on at its root, no
``unified``, the machine's kubectl shadowed by a script that fails. It must pass and leave
nothing behind, in the simulated hierarchy or on the machine. What the simulation covers and
what not is said in purev2.py.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import up as sb
from sandbox.cgroups import remove_cgroup_tree
from tests.support.kubectl import VENV_KUBECTL

REPO = Path(__file__).resolve().parent.parent
SUPPORT = REPO / "tests" / "support"
SLICE = [
    "tests/dataplane/test_dataplane_lb.py::test_uniform_split_chi_square",
    "tests/dataplane/test_dataplane_inspect.py::test_bpftool_shows_programs_on_test_cgroup_not_root",
    "tests/daemon/test_daemon_integration.py::test_enrolling_namespace_annotates_pods_and_translates",
    "tests/sandbox/test_cgroups.py::test_removes_nested_cgroups_and_kills_their_processes",
    "tests/sandbox/test_sandbox_kubelet.py::test_kubectl_get_describe_logs",  # a sandbox on free ports
]
WALKTHROUGH = [  # `make demo`'s path; needs istiod's and the daemon's fixed ports
    "tests/sandbox/test_sandbox_e2e.py::test_walkthrough_enable_after_pods_exist",
    "tests/sandbox/test_sandbox_e2e.py::test_kubectl_views_of_the_daemon",
]
E2E_PORTS = (15010, 15012, 15200, 15020)  # the walkthrough's fixed ports (see test_sandbox_e2e.py)


def _leftovers(prefix: str, cgroup: Path) -> list[str]:
    """What the inner run left: cgroups, netns, links, /tmp entries or mounts named by its prefix."""
    found = [f"cgroup {p}" for p in cgroup.rglob("*") if p.is_dir() and p != cgroup / "runner"]
    found += [f"pids {pids} in {p.parent}" for p in cgroup.rglob("cgroup.procs")
              if (pids := p.read_text().split())]
    netns = Path("/run/netns")
    found += [f"netns {p.name}" for p in (netns.iterdir() if netns.is_dir() else []) if prefix in p.name]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [f"link {ln.split(':')[1].strip()}" for ln in links.splitlines() if prefix in ln]
    found += [f"/tmp/{p.name}" for p in Path("/tmp").iterdir() if p.name.startswith(prefix)]
    found += [f"mount {ln}" for ln in Path("/proc/self/mountinfo").read_text().splitlines() if prefix in ln]
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, cgroups, BPF)")
def test_slice_on_pure_cgroup_v2_without_the_machines_kubectl(test_cgroup: Path, tmp_path: Path) -> None:
    # Another sandbox on this shared machine may hold the walkthrough's fixed ports: then the
    # slice runs without it (the e2e module would skip itself), the rest is still checked.
    tests = (WALKTHROUGH if all(sb.port_free(p) for p in E2E_PORTS) else []) + SLICE  # first: ports race
    assert os.access(VENV_KUBECTL, os.X_OK), "no .venv/bin/kubectl: run `make setup`"
    prefix = "kv" + secrets.token_hex(3)  # 8 characters like the suite's own, for interface names
    cgroup = test_cgroup / "purev2"
    cgroup.mkdir()
    marker = tmp_path / "machine-kubectl-used"
    shadow = tmp_path / "shadow" / "kubectl"
    shadow.parent.mkdir()
    shadow.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\necho "machine kubectl: shadowed" >&2\nexit 97\n')
    shadow.chmod(0o755)
    inner = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
             "-p", "tests.support.v2audit", "--basetemp", str(tmp_path / "inner"), *tests]
    cmd = [sys.executable, str(SUPPORT / "purev2.py"), "enter", str(cgroup), str(shadow), "--", *inner]
    try:
        p = subprocess.run(cmd, cwd=REPO, env={**os.environ, "KMESH_TEST_RUN_PREFIX": prefix},
                           capture_output=True, text=True, timeout=300)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-6000:]
        assert "controllers enabled at its root" in p.stderr, out[-3000:]
        assert re.search(rf"\b{len(tests)} passed\b", p.stdout) and "skipped" not in p.stdout, out[-3000:]
        assert not marker.exists(), f"a kubectl other than .venv/bin's ran: {marker.read_text()}"
        assert _leftovers(prefix, cgroup) == []
    finally:
        remove_cgroup_tree(cgroup)


def test_cgroup_v2_location_is_only_detected() -> None:
    """No file hard-codes the hybrid layout's cgroup v2 path; daemon/cgroupmount.py detects it."""
    needle = "cgroup/" + "unified"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    hits = []
    for name in files.stdout.splitlines():
        path = REPO / name
        try:
            if needle in path.read_text(errors="ignore"):
                hits.append(name)
        except (IsADirectoryError, FileNotFoundError):
            continue
    assert hits == ["daemon/cgroupmount.py"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)")
def test_audit_finds_a_process_beside_child_cgroups(test_cgroup: Path) -> None:
    """The slice's layout check (tests/support/v2audit.py) really fails on a broken layout."""
    from tests.support.v2audit import internal_processes

    top = test_cgroup / "audit"
    (top / "parent" / "child").mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert internal_processes(top) == []
        (top / "parent" / "cgroup.procs").write_text(str(sleeper.pid))
        assert [f.split(" holds")[0] for f in internal_processes(top)] == [str(top / "parent")]
        (top / "parent" / "child" / "cgroup.procs").write_text(str(sleeper.pid))  # a leaf: fine
        assert internal_processes(top) == []
    finally:
        remove_cgroup_tree(top)
        sleeper.wait(timeout=10)
