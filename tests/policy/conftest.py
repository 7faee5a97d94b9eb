"""AuthorizationPolicy end to end: sandbox API server -> sandbox pilot -> XdsClient/State and the daemon.

One session-wide control plane (in-process sandbox API server + ``python -m sandbox.pilot``
subprocess, plaintext xDS like istiod :15010). ``xds`` gives a real ``XdsClient`` feeding a
real ``State``; ``daemon`` starts the real ``python -m daemon`` (setup copied from
tests/daemon/conftest.py, reduced to what policies need: a child cgroup of the test cgroup, a
private bpffs, no pods, ``--no-enroll``) for the ``kmeshctl dump policies`` test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.cgroups import remove_cgroup_tree
from tests.support.procs import free_port, start_logged, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ROOT_NS = "istio-system"
GROUP, VERSION, PLURAL = "security.istio.io", "v1", "authorizationpolicies"


@dataclass
class Cluster:
    """The sandbox API server (in process) and the sandbox pilot (child process)."""

    work: Path
    api: Any = None
    kubeconfig: Path = Path()
    client: Any = None
    core: Any = None
    custom: Any = None
    pilot: subprocess.Popen | None = None
    ports: tuple[int, int] = (0, 0)  # (tls, plaintext), kept across pilot restarts

    def start_pilot(self) -> None:
        cmd = [PY, "-m", "sandbox.pilot", "--kubeconfig", str(self.kubeconfig), "--cluster-id", "Kubernetes",
               "--revision", "1-22", "--tls-port", str(self.ports[0]), "--plaintext-port", str(self.ports[1]),
               "--state-dir", str(self.work / "pilot")]
        self.pilot, line = start_logged(cmd, self.work / "pilot.log", "ready tls=", "sandbox.pilot")
        parts = dict(p.split("=") for p in line.split()[1:])
        self.ports = (int(parts["tls"]), int(parts["plaintext"]))

    def stop_pilot(self) -> None:
        stop_process(self.pilot)
        self.pilot = None

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def pilot_log(self) -> str:
        return (self.work / "pilot.log").read_text()

    # ----- objects ------------------------------------------------------------------------
    def namespace(self, name: str) -> str:
        from kubernetes.client.rest import ApiException

        try:
            self.core.create_namespace({"metadata": {"name": name}})
        except ApiException as e:
            if e.status != 409:
                raise
        return name

    def policy(self, ns: str, name: str, spec: dict[str, Any], version: str = VERSION,
               annotations: dict[str, str] | None = None) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{version}", "kind": "AuthorizationPolicy",
                "metadata": {"name": name, "annotations": annotations or {}}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, version, ns, PLURAL, body)

    def patch_policy(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        current = self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        current["spec"] = spec
        self.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, current)

    def delete_policy(self, ns: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def pod(self, ns: str, name: str, labels: dict[str, str], ip: str) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "fortio"}]}}
        self.core.create_namespaced_pod(ns, body)
        self.core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}})

    def label_pod(self, ns: str, name: str, labels: dict[str, str | None]) -> None:
        self.core.patch_namespaced_pod(name, ns, {"metadata": {"labels": labels}})


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from kubernetes import client, config

    from sandbox.apiserver import ApiServer

    work = tmp_path_factory.mktemp("policy")
    c = Cluster(work=work, kubeconfig=work / "kubeconfig")
    c.api = ApiServer(port=0)
    c.api.start()
    try:
        c.api.write_kubeconfig(c.kubeconfig, "sandbox")
        c.client = config.new_client_from_config(config_file=str(c.kubeconfig))
        c.core = client.CoreV1Api(c.client)
        c.custom = client.CustomObjectsApi(c.client)
        c.namespace(ROOT_NS)
        c.start_pilot()
        yield c
    finally:
        c.stop_pilot()
        c.api.stop()


@pytest.fixture
def xds(cluster: Cluster) -> Iterator[Callable[[], tuple[Any, Any]]]:
    """Factory of (XdsClient, State) subscribed to the pilot; all stopped at the end of the test."""
    from daemon.state import State
    from daemon.xds.client import XdsClient, XdsConfig

    clients: list[Any] = []

    def make() -> tuple[Any, Any]:
        state = State(node_name="node-1", cluster_id="Kubernetes")
        c = XdsClient(XdsConfig(address=cluster.xds_address, plaintext=True, pod_name="kmesh-policy",
                                pod_namespace="kmesh-system", node_name="node-1",
                                initial_backoff_s=0.05, max_backoff_s=0.5), state)
        clients.append(c)
        c.start()
        wait_for(lambda: c.status()["ready"], 20, "xDS client ready")
        return c, state

    yield make
    for c in clients:
        c.stop()


# ----- the real daemon -----------------------------------------------------------------------

@dataclass
class Daemon:
    work: Path
    cgroup: Path
    bpffs: Path
    admin: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def get(self, path: str) -> Any:
        import json

        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def kmeshctl(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "KMESH_SANDBOX_DIR": str(self.work / "no-sandbox"),
               "KUBECONFIG": str(self.work / "no-kubeconfig")}
        return subprocess.run([PY, "-m", "kmeshctl.main", *args, "--admin-addr", self.admin], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def daemon(cluster: Cluster, run_prefix: str, test_cgroup: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        pytest.skip("the daemon needs root (cgroups, BPF)")
    work = tmp_path_factory.mktemp("pold")
    d = Daemon(work=work, cgroup=test_cgroup / "pold", bpffs=Path(f"/tmp/{run_prefix}-pol-bpffs"),
               admin=f"127.0.0.1:{free_port()}")
    d.env = {"XDS_ADDRESS": cluster.xds_address, "CLUSTER_ID": "Kubernetes", "NODE_NAME": "node-1",
             "POD_NAME": f"kmesh-{run_prefix}", "POD_NAMESPACE": "kmesh-system", "INSTANCE_IP": "127.0.0.1",
             "SERVICE_ACCOUNT": "kmesh", "BCC_KERNEL_SOURCE": os.environ.get("BCC_KERNEL_SOURCE", "")}
    flags = ["--cgroup-root", str(d.cgroup), "--bpf-fs", str(d.bpffs), "--pin-prefix", "kmesh"]
    mounted = False
    try:
        d.cgroup.mkdir(exist_ok=True)
        d.bpffs.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(d.bpffs)], check=True, timeout=30)
        mounted = True
        cmd = [PY, "-m", "daemon", *flags, "--proc-root", "/proc", "--admin-addr", d.admin,
               "--metrics-addr", f"127.0.0.1:{free_port()}", "--plaintext", "--no-enroll",
               "--kubeconfig", str(cluster.kubeconfig)]
        d.proc, _ = start_logged(cmd, work / "daemon.log", "kmesh-daemon started", "daemon", d.env,
                                 timeout=120)
        yield d
    finally:
        stop_process(d.proc)
        if (d.bpffs / "kmesh").exists():
            subprocess.run([PY, "-m", "daemon", "uninstall", *flags], cwd=REPO, env={**os.environ, **d.env},
                           capture_output=True, timeout=120, check=False)
        remove_cgroup_tree(d.cgroup)
        if mounted:
            shutil.rmtree(d.bpffs / "kmesh", ignore_errors=True)
            subprocess.run(["umount", str(d.bpffs)], check=False, timeout=30)
        try:
            d.bpffs.rmdir()
        except OSError:
            pass
