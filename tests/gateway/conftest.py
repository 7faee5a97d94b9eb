"""Waypoint control plane: the sandbox API server (in process) and ``python -m sandbox.pilot``.

The pilot runs with revision ``1-22-6`` (as `make demo` installs it). There is no kubelet: the
tests play its part where they need to (a pod's IP and readiness, a Deployment's readyReplicas),
through the official client's /status endpoints, so the gateway controller and the workload xDS
are checked without a real Envoy. xDS is read by a real ``XdsClient`` + ``State`` over gRPC.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.kubectl import kubectl_path
from tests.support.procs import start_logged, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION = "gateway.networking.k8s.io", "v1"
REVISION = "1-22-6"


@dataclass
class Cluster:
    work: Path
    api: Any = None
    kubeconfig: Path = Path()
    client: Any = None
    core: Any = None
    apps: Any = None
    custom: Any = None
    pilot: subprocess.Popen | None = None
    ports: tuple[int, int] = (0, 0)

    def start_pilot(self) -> None:
        cmd = [sys.executable, "-m", "sandbox.pilot", "--kubeconfig", str(self.kubeconfig), "--cluster-id",
               "Kubernetes", "--revision", REVISION, "--tls-port", "0", "--plaintext-port", "0",
               "--state-dir", str(self.work / "pilot")]
        self.pilot, line = start_logged(cmd, self.work / "pilot.log", "ready tls=", "sandbox.pilot")
        parts = dict(p.split("=") for p in line.split()[1:])
        self.ports = (int(parts["tls"]), int(parts["plaintext"]))

    def pilot_log(self) -> str:
        return (self.work / "pilot.log").read_text()

    def kubectl(self, *args: str, stdin: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([kubectl_path(), "--kubeconfig", str(self.kubeconfig), *args], input=stdin,
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {p.stderr}")
        return p

    # ----- objects ------------------------------------------------------------------------
    def namespace(self, name: str, labels: dict[str, str] | None = None) -> str:
        self.core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        return name

    def gateway(self, ns: str, name: str = "waypoint", labels: dict[str, str] | None = None,
                annotations: dict[str, str] | None = None, klass: str = "istio-waypoint") -> dict:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Gateway",
                "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
                "spec": {"gatewayClassName": klass,
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, ns, "gateways", body)

    def get_gateway(self, ns: str, name: str = "waypoint") -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, "gateways", name)

    def patch_gateway(self, ns: str, patch: dict, name: str = "waypoint") -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "gateways", name, patch)

    def service(self, ns: str, name: str, selector: dict[str, str], labels: dict[str, str] | None = None,
                port: int = 80, target: int = 8080) -> dict:
        return self.core.create_namespaced_service(ns, {
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": target}]},
        }).to_dict()

    def pod(self, ns: str, name: str, labels: dict[str, str], ip: str) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
                "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "fortio"}]}}
        self.core.create_namespaced_pod(ns, body)
        self.core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}]}})

    def deployment_ready(self, ns: str, name: str, ready: int) -> None:
        """What the kubelet's deployment controller would write once the waypoint pod is Ready."""
        self.apps.patch_namespaced_deployment_status(name, ns, {"status": {
            "replicas": 1, "readyReplicas": ready, "availableReplicas": ready, "updatedReplicas": 1,
            "observedGeneration": 1}})


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from kubernetes import client, config

    from sandbox.apiserver import ApiServer

    work = tmp_path_factory.mktemp("waypoint")
    c = Cluster(work=work, kubeconfig=work / "kubeconfig")
    c.api = ApiServer(port=0)
    c.api.start()
    try:
        c.api.write_kubeconfig(c.kubeconfig, "sandbox")
        c.client = config.new_client_from_config(config_file=str(c.kubeconfig))
        c.core = client.CoreV1Api(c.client)
        c.apps = client.AppsV1Api(c.client)
        c.custom = client.CustomObjectsApi(c.client)
        c.start_pilot()
        yield c
    finally:
        stop_process(c.pilot)
        c.api.stop()


@pytest.fixture
def xds(cluster: Cluster) -> Iterator[Callable[[], tuple[Any, Any]]]:
    """Factory of (XdsClient, State) subscribed to the pilot over plaintext gRPC."""
    from daemon.state import State
    from daemon.xds.client import XdsClient, XdsConfig

    clients: list[Any] = []

    def make() -> tuple[Any, Any]:
        state = State(node_name="node-1", cluster_id="Kubernetes")
        c = XdsClient(XdsConfig(address=f"127.0.0.1:{cluster.ports[1]}", plaintext=True,
                                pod_name="kmesh-waypoint-test", pod_namespace="kmesh-system",
                                node_name="node-1", initial_backoff_s=0.05, max_backoff_s=0.5), state)
        clients.append(c)
        c.start()
        wait_for(lambda: c.status()["ready"], 20, "xDS client ready")
        return c, state

    yield make
    for c in clients:
        c.stop()
