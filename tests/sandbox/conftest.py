"""Fixtures of the sandbox tests: one node runtime per module, always torn down."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.kubelet.runtime import Runtime
from tests.support.kubectl import kubectl_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runtime(
    run_prefix: str, test_cgroup: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runtime]:
    """A node runtime under the test cgroup, prefix `<run_prefix>s` (own netns names)."""
    rt = Runtime(tmp_path_factory.mktemp("node"), test_cgroup / f"{run_prefix}-rt", f"{run_prefix}s")
    rt.setup()
    try:
        yield rt
    finally:
        rt.teardown()


@pytest.fixture(scope="module")
def sandbox(run_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxHandle]:
    """A whole sandbox (API server, pilot, kubelet) for one test module; `down` always runs."""
    from sandbox import up as sb

    directory = tmp_path_factory.mktemp("sandbox")
    st = sb.up(directory, timeout=60, xds_ports=(sb.free_port(), sb.free_port()), prefix=f"{run_prefix}k")
    handle = SandboxHandle(directory, st)
    try:
        yield handle
    finally:
        sb.down(directory)


class SandboxHandle:
    """Paths and helpers to drive one test sandbox with kubectl and kmeshctl, as a user would."""

    def __init__(self, directory: Path, state: object) -> None:
        self.dir = directory
        self.state = state
        self.kubeconfig = directory / "kubeconfig"
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KMESH_SANDBOX_DIR": str(directory)}

    def kubectl(
        self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        r = subprocess.run(
            [kubectl_path(), *args], capture_output=True, text=True, env=self.env, input=stdin,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {r.stderr}")
        return r

    def kmeshctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / ".venv" / "bin" / "kmeshctl"), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, manifest: str) -> None:
        self.kubectl("apply", "--server-side", "-f", "-", stdin=manifest)

    def wait(self, predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> object:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
            except (AssertionError, KeyError, IndexError, ValueError):
                last = None
            if last:
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def sandbox_handle_cls() -> type[SandboxHandle]:
    return SandboxHandle
