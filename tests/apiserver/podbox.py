"""A pod for the exec/port-forward tests without a whole sandbox: a Pod object on the in-process API
server whose runtime info (the ``pod.json`` a kubelet publishes) names a real process of ours,
``sleep``, as its one container. hostNetwork, so port-forward reaches this machine's loopback;
exec enters the process's namespaces and root exactly as for a sandbox pod.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apiserver.conftest import Cluster
from tests.support.kubectl import kubectl_path


@dataclass
class PodBox:
    cluster: Cluster
    namespace: str
    name: str
    proc: subprocess.Popen
    env: dict[str, str]

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 60,
                extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([kubectl_path(), "-n", self.namespace, *args], input=stdin, capture_output=True,
                              text=True, timeout=timeout, env={**self.env, **(extra_env or {})})


def make_pod_box(cluster: Cluster, tmp: Path, cgroup: Path) -> Iterator[PodBox]:
    if os.geteuid() != 0:
        pytest.skip("needs root (exec joins the container's namespaces and cgroup)")
    kubectl_path()  # a one-line error when there is none
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    ns = cluster.new_namespace("box")
    proc = subprocess.Popen(["sleep", "3600"])
    info = tmp / "pod.json"
    pod = core.create_namespaced_pod(ns, {
        "metadata": {"name": "box", "annotations": {"sandbox.kmesh.io/runtime-info": str(info)}},
        "spec": {"nodeName": "node-t", "hostNetwork": True,
                 "containers": [{"name": "main", "image": "busybox"}]}})
    core.patch_namespaced_pod_status("box", ns, {"status": {"phase": "Running", "podIP": "127.0.0.1"}})
    info.write_text(json.dumps({
        "uid": pod.metadata.uid, "namespace": ns, "name": "box", "hostNetwork": True, "netns": None,
        "ip": "127.0.0.1", "cgroup": str(cgroup),
        "containers": {"main": {"pid": proc.pid, "cgroup": str(cgroup)}},
    }))
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUBECACHEDIR": str(tmp / "cache")}
    try:
        yield PodBox(cluster, ns, "box", proc, env)
    finally:
        proc.kill()
        proc.wait()


def children() -> set[int]:
    """Live (non-zombie) processes whose parent is this test process."""
    me, out = str(os.getpid()), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields[1].decode() == me and fields[0] != b"Z":
            out.add(int(entry))
    return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def settle(predicate, timeout: float = 20.0) -> bool:
    """Poll until ``predicate()`` holds (the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()
