"""A sandbox API server (in-process) plus the sandbox pilot (a real subprocess) for xds tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


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
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stderr=logf, stdout=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pilot exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            for line in reversed(self.log.read_text().splitlines()):
                if line.startswith("ready tls="):
                    parts = dict(p.split("=") for p in line.split()[1:])
                    self.tls_port, self.plain_port = int(parts["tls"]), int(parts["plaintext"])
                    self.log.write_text("")  # next start waits for a fresh ready line
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
