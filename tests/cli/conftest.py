"""Fixtures for the kmeshctl tests: run the CLI as a subprocess; a sandbox API server.

The CLI is always run as a separate process (``python -m kmeshctl.main``), exactly as a user
runs it, and the cluster side is checked through the official kubernetes client and kubectl.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.kubectl import kubectl_path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def _env(kubeconfig: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KMESHCTL_DEBUG")}
    env["PYTHONPATH"] = str(REPO)
    env["COLUMNS"] = "200"
    if kubeconfig is not None:
        env["KUBECONFIG"] = kubeconfig
    env.update(extra or {})
    return env


def run_cli(*args: str, kubeconfig: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> Result:
    """Run ``kmeshctl ARGS`` in a subprocess; KUBECONFIG is only what the test gives."""
    p = subprocess.run([sys.executable, "-m", "kmeshctl.main", *args], capture_output=True, text=True,
                       env=_env(kubeconfig, env), cwd=str(REPO), timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ApiServer:
    port: int
    kubeconfig: str
    proc: subprocess.Popen

    def client(self):  # the official client, for assertions
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg, persist_config=False)
        return client.ApiClient(configuration=cfg)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([kubectl_path(), "--kubeconfig", self.kubeconfig, *args], capture_output=True,
                           text=True, timeout=60)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr}")
        return p


def start_apiserver(tmp: Path) -> ApiServer:
    """``python -m sandbox.apiserver`` on a free port; waits for its "ready" line."""
    port = free_port()
    kubeconfig = tmp / "kubeconfig"
    log = (tmp / "apiserver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.apiserver", "--port", str(port),
                             "--kubeconfig", str(kubeconfig), "--state-dir", str(tmp / "state")],
                            cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, env=_env(None, None))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sandbox.apiserver exited {proc.returncode}: "
                               f"{(tmp / 'apiserver.log').read_text()[-2000:]}")
        if kubeconfig.exists() and "ready" in (tmp / "apiserver.log").read_text():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return ApiServer(port, str(kubeconfig), proc)
            except OSError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("sandbox.apiserver did not become ready in 30 s")


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A fresh sandbox API server per test module (modules do not see each other's objects)."""
    srv = start_apiserver(tmp_path_factory.mktemp("apiserver"))
    try:
        yield srv
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()


@pytest.fixture
def fresh_apiserver(tmp_path: Path) -> Iterator[ApiServer]:
    """A new, empty sandbox API server for one test (install tests need a clean cluster)."""
    srv = start_apiserver(tmp_path)
    try:
        yield srv
    finally:
        srv.proc.terminate()
        try:
            srv.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()


SNAPSHOT_KINDS = [
    ("", "v1", "namespaces", False), ("", "v1", "serviceaccounts", True), ("", "v1", "services", True),
    ("", "v1", "configmaps", True), ("", "v1", "pods", True),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", False),
    ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", False),
    ("apps", "v1", "daemonsets", True), ("networking.istio.io", "v1alpha3", "envoyfilters", True),
]


def snapshot(srv: ApiServer) -> dict[tuple[str, str, str], str]:
    """(resource, namespace, name) -> resourceVersion of everything install/enroll could touch,
    read with the official client, to prove that a failed command changed nothing."""
    from kubernetes import client

    api = srv.client()
    custom = client.CustomObjectsApi(api)
    out: dict[tuple[str, str, str], str] = {}
    for group, version, plural, _ in SNAPSHOT_KINDS:
        if group == "":
            core = client.CoreV1Api(api)
            items = {
                "namespaces": core.list_namespace,
                "serviceaccounts": core.list_service_account_for_all_namespaces,
                "services": core.list_service_for_all_namespaces,
                "configmaps": core.list_config_map_for_all_namespaces,
                "pods": core.list_pod_for_all_namespaces,
            }[plural]().items
            for it in items:
                out[(plural, it.metadata.namespace or "", it.metadata.name)] = it.metadata.resource_version
        else:
            for it in custom.list_cluster_custom_object(group, version, plural)["items"]:
                m = it["metadata"]
                out[(plural, m.get("namespace", ""), m["name"])] = m["resourceVersion"]
    return out
