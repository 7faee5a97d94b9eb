"""A sandbox API server (in-process) plus the sandbox pilot (a real subprocess) for xds tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon.state import State
from daemon.xds.client import XdsClient, XdsConfig

REPO = Path(__file__).resolve().parents[2]
NS = "shop"
SA_NS = "kmesh-system"


class PilotProcess:
    """``python -m sandbox.pilot`` as a child process; restartable on the same ports."""

    def __init__(self, kubeconfig: Path, state_dir: Path, cluster_id: str = "Kubernetes",
                 revision: str = "1-22") -> None:
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.cluster_id = cluster_id
        self.revision = revision
        self.tls_port = 0
        self.plain_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "pilot.log"

    def start(self, timeout: float = 30.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "sandbox.pilot", "--kubeconfig", str(self.kubeconfig),
               "--cluster-id", self.cluster_id, "--revision", self.revision,
               "--tls-port", str(self.tls_port), "--plaintext-port", str(self.plain_port),
               "--state-dir", str(self.state_dir)]
        offset = self.log.stat().st_size if self.log.exists() else 0
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=logf, stdout=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pilot exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with self.log.open("rb") as f:
                f.seek(offset)
                fresh = f.read().decode(errors="replace")
            for line in fresh.splitlines():
                if line.startswith("ready tls="):
                    parts = dict(p.split("=") for p in line.split()[1:])
                    self.tls_port, self.plain_port = int(parts["tls"]), int(parts["plaintext"])
                    return
            time.sleep(0.05)
        raise RuntimeError(f"pilot not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def service_body(name: str, selector: dict[str, str], ports: list[dict[str, Any]],
                 **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector, "ports": ports, **spec}}


def pod_body(name: str, labels: dict[str, str], node: str = "node-1",
             container_ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [
                {"name": "app", "image": "fortio", "ports": container_ports or []}]}}


def set_pod_status(core: Any, ns: str, name: str, ip: str | None, ready: bool) -> None:
    status: dict[str, Any] = {"phase": "Running",
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    core.patch_namespaced_pod_status(name, ns, {"status": status})


class Env:
    def __init__(self, root: Path) -> None:
        from kubernetes import client, config

        from sandbox.apiserver import ApiServer

        self.root = root
        self.api = ApiServer(port=0)
        self.api.start()
        self.kubeconfig = root / "kubeconfig"
        self.api.write_kubeconfig(self.kubeconfig, "sandbox")
        self.kc = config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = client.CoreV1Api(self.kc)
        for ns in (NS, SA_NS):
            self.core.create_namespace({"metadata": {"name": ns}})
        self.core.create_namespaced_service_account(SA_NS, {"metadata": {"name": "kmesh"}})
        self.token = root / "istio-token"
        self.token.write_text(self.request_token(SA_NS, "kmesh"))
        self.pilot = PilotProcess(self.kubeconfig, root / "pilot", cluster_id="Kubernetes", revision="1-22")
        self.pilot.start()
        self.clients: list[XdsClient] = []

    def request_token(self, ns: str, sa: str, audience: str = "istio-ca") -> str:
        body = {"spec": {"audiences": [audience], "expirationSeconds": 3600}}
        return self.core.create_namespaced_service_account_token(sa, ns, body).status.token

    def client(self, state: State | None = None, **kw: Any) -> tuple[XdsClient, State]:
        cfg: dict[str, Any] = dict(
            address=f"127.0.0.1:{self.pilot.tls_port}", ca_path=self.pilot.state_dir / "root-cert.pem",
            server_name="istiod-1-22.istio-system.svc", token_path=self.token, cluster_id="Kubernetes",
            pod_name="kmesh-x", pod_namespace=SA_NS, service_account="kmesh", node_name="node-1",
            initial_backoff_s=0.05, max_backoff_s=0.5)
        cfg.update(kw)
        st = state or State(node_name="node-1")
        c = XdsClient(XdsConfig(**cfg), st)
        self.clients.append(c)
        c.start()
        return c, st

    def close(self) -> None:
        for c in self.clients:
            c.stop()
        self.pilot.stop()
        self.api.stop()
