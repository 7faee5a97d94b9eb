"""Enrollment rules (Kmesh's ShouldEnroll) and the pod-UID -> netns lookup through /proc."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from daemon.enroll import PodInfo, find_pod_pids, netns_path, should_enroll

KM = {"istio.io/dataplane-mode": "Kmesh"}


def pod(labels: dict[str, str] | None = None, host_network: bool = False,
        containers: tuple[str, ...] = ("app",), ips: tuple[str, ...] = ("10.0.0.1",)) -> PodInfo:
    return PodInfo(uid="u1", name="p", namespace="ns", labels=labels or {}, host_network=host_network,
                   containers=containers, pod_ips=ips)


@pytest.mark.parametrize(
    ("pod_labels", "ns_labels", "extra", "managed", "why"),
    [
        ({}, KM, {}, True, "namespace label"),
        ({}, {"istio.io/dataplane-mode": "kmesh"}, {}, True, "namespace label"),
        ({}, {"istio.io/dataplane-mode": "KMESH"}, {}, True, "namespace label"),
        (KM, {}, {}, True, "pod label"),
        ({"istio.io/dataplane-mode": "kmesh"}, None, {}, True, "pod label"),
        ({"istio.io/dataplane-mode": "none"}, KM, {}, False, "pod label none"),
        ({"istio.io/dataplane-mode": "ambient"}, {}, {}, False, "not labelled"),
        ({}, {"istio.io/dataplane-mode": "ambient"}, {}, False, "not labelled"),
        ({}, {}, {}, False, "not labelled"),
        ({}, KM, {"host_network": True}, False, "hostNetwork pod"),
        (KM, KM, {"containers": ("app", "istio-proxy")}, False, "has an istio-proxy sidecar"),
        ({"gateway.istio.io/managed": "istio.io-mesh-controller"}, KM, {}, False, "waypoint pod"),
    ],
)
def test_should_enroll_table(pod_labels: dict[str, str], ns_labels: dict[str, str] | None,
                             extra: dict, managed: bool, why: str) -> None:
    assert should_enroll(pod(pod_labels, **extra), ns_labels) == (managed, why)


def test_pod_from_json_native_sidecar_and_ipv6() -> None:
    obj = {"metadata": {"uid": "u", "name": "p", "namespace": "n", "labels": KM},
           "spec": {"nodeName": "node1", "containers": [{"name": "app"}],
                    "initContainers": [{"name": "istio-proxy", "restartPolicy": "Always"}]},
           "status": {"phase": "Running", "podIPs": [{"ip": "fd00::5"}]}}
    p = PodInfo.from_json(obj)
    assert p.node_name == "node1" and p.ipv6_only and p.pod_ips == ("fd00::5",)
    assert should_enroll(p, {}) == (False, "has an istio-proxy sidecar")


def _fake_proc(root: Path, entries: dict[int, str]) -> None:
    for pid, cgroup in entries.items():
        d = root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        (d / "ns" / "net").write_text("")
    (root / "self").mkdir()
    (root / "sys").mkdir()


def test_find_pod_pids_cgroupfs_systemd_and_other(tmp_path: Path) -> None:
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    _fake_proc(tmp_path, {
        1: "0::/init.scope\n",
        40: f"12:memory:/kubepods/burstable/pod{a}/0f1e2d\n0::/kubepods/burstable/pod{a}/0f1e2d\n",
        41: f"0::/kubepods/burstable/pod{a}/other-container\n",
        77: "0::/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{b.replace('-', '_')}.slice/"
            "cri-containerd-abc.scope\n",
        90: "0::/sandbox/pod-plainuid-1/app\n",
    })
    found = find_pod_pids(tmp_path, [a, b, c, "plainuid-1"])
    assert found == {a: 40, b: 77, "plainuid-1": 90}
    assert netns_path(tmp_path, found[a]) == tmp_path / "40" / "ns" / "net"
    assert find_pod_pids(tmp_path, []) == {}
    assert find_pod_pids(tmp_path / "missing", [a]) == {}


def test_find_pod_pids_real_proc_finds_our_own_cgroup() -> None:
    """On the real /proc: a UID-shaped component of our own cgroup path resolves to a live pid."""
    text = Path("/proc/self/cgroup").read_text()
    uid = str(uuid.uuid4())
    assert uid not in text
    assert find_pod_pids(Path("/proc"), [uid]) == {}
    assert os.path.exists(netns_path(Path("/proc"), os.getpid()))
