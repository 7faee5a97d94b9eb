"""Fixtures for the sandbox API server tests: one in-process server per test module.

Clients are the unmodified official ``kubernetes`` Python client and the real ``kubectl``,
both over HTTP through a kubeconfig the server wrote.
"""

from __future__ import annotations

import itertools
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sandbox.apiserver import ApiServer
from tests.support.kubectl import kubectl_path

_ns_counter = itertools.count(1)


@dataclass
class Cluster:
    server: ApiServer
    kubeconfig: Path
    cache_dir: Path
    _clients: list[Any] = field(default_factory=list)

    def api_client(self, token: str | None = None) -> Any:
        """An official-client ApiClient from the kubeconfig (optionally with another bearer token)."""
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        if token is not None:
            cfg = api.configuration
            cfg.refresh_api_key_hook = None
            cfg.api_key = {"BearerToken": f"Bearer {token}"}
            api.close()
            api = client.ApiClient(cfg)
        self._clients.append(api)
        return api

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [kubectl_path(), "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache_dir),
               *args]
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def new_namespace(self, prefix: str = "t") -> str:
        """A fresh namespace for one test (tests in a module share the server)."""
        from kubernetes import client

        name = f"{prefix}-{next(_ns_counter)}"
        client.CoreV1Api(self.api_client()).create_namespace({"metadata": {"name": name}})
        return name


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _start(tmp: Path, **kwargs: Any) -> Iterator[Cluster]:
    server = ApiServer(port=0, state_dir=tmp / "state", **kwargs)
    server.start()
    kubeconfig = server.write_kubeconfig(tmp / "kubeconfig")
    cluster = Cluster(server, kubeconfig, tmp / "kubectl-cache")
    try:
        yield cluster
    finally:
        for api in cluster._clients:
            api.close()
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running API server (started once per test module) and clients for it."""
    yield from _start(tmp_path_factory.mktemp("apiserver"))


@pytest.fixture(scope="module")
def small_history_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server that keeps only 20 watch events, to make resourceVersions expire quickly."""
    yield from _start(tmp_path_factory.mktemp("apiserver-small"), watch_history=20)


@pytest.fixture(scope="module")
def graceful_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server with graceful pod deletion (pods on a node wait for their kubelet)."""
    yield from _start(tmp_path_factory.mktemp("apiserver-graceful"), graceful_pod_deletion=True)
