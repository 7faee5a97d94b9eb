"""Fixtures for the xds tests: an in-process delta ADS server and a client factory."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.state import State
from daemon.xds.client import XdsClient, XdsConfig
from sandbox.pilot.server import Authenticator, ResourceStore, serve


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class AdsHarness:
    """A real gRPC delta ADS server (sandbox.pilot.server) that can be stopped and restarted."""

    def __init__(self) -> None:
        self.store = ResourceStore()
        self.port = 0
        self.server: Any = None
        self.servicer: Any = None
        self.tls: tuple[bytes, bytes] | None = None
        self.authenticator: Authenticator | None = None
        self.honor_versions = True

    def start(self, store: ResourceStore | None = None) -> None:
        if store is not None:
            self.store = store
        self.server, self.port, self.servicer = serve(self.store, self.port, self.authenticator, tls=self.tls,
                                                      honor_versions=self.honor_versions)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait(5)
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def ads() -> Iterator[AdsHarness]:
    h = AdsHarness()
    h.start()
    yield h
    h.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[XdsClient, State]]]:
    clients: list[XdsClient] = []

    def make(address: str, state: State | None = None, **kw: Any) -> tuple[XdsClient, State]:
        kw.setdefault("plaintext", True)
        kw.setdefault("pod_name", "kmesh-abc")
        kw.setdefault("pod_namespace", "kmesh-system")
        kw.setdefault("instance_ip", "10.0.0.5")
        kw.setdefault("initial_backoff_s", 0.05)
        kw.setdefault("max_backoff_s", 1.0)
        st = state or State(node_name=kw.get("node_name", ""))
        c = XdsClient(XdsConfig(address=address, **kw), st)
        clients.append(c)
        c.start()
        return c, st

    yield make
    for c in clients:
        c.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    p = tmp_path / "istio-token"
    p.write_text("token-one\n")
    return p


@pytest.fixture(scope="session")
def pilot_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One sandbox API server (in-process) + sandbox pilot (subprocess) for the whole session."""
    from sandbox_env import Env

    e = Env(tmp_path_factory.mktemp("pilot"))
    yield e
    e.close()


@pytest.fixture(autouse=True)
def _stop_pilot_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    """Clients a test made on the session pilot stop with the test (no reconnecting leftovers)."""
    if "pilot_env" not in request.fixturenames:
        yield
        return
    env = request.getfixturevalue("pilot_env")
    before = len(env.clients)
    yield
    for c in env.clients[before:]:
        c.stop()


@pytest.fixture(scope="session")
def xds_dataplane(run_prefix: str, test_cgroup: Path) -> Iterator[Any]:
    """The real BPF Dataplane in a child cgroup of the test cgroup, pins on a private bpffs.

    Skipped when not root or when the data plane cannot be loaded here.
    """
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("the BPF data plane needs root")
    from daemon.dataplane import Dataplane, bpfsys

    sysfs = Path("/sys/fs/bpf")
    mounted: Path | None = None
    if sysfs.is_dir() and bpfsys.is_bpffs(str(sysfs)):
        root = sysfs / f"{run_prefix}-xds"
    else:  # a fresh bpffs instance of our own, nothing shared with the machine
        mounted = Path(f"/tmp/{run_prefix}-xds-bpffs")
        mounted.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", str(mounted)], check=True)
        root = mounted / "pins"
    cgroup = test_cgroup / "xds"
    cgroup.mkdir(exist_ok=True)
    dp = None
    try:
        dp = Dataplane.open(cgroup, root)
        yield dp
    finally:
        if dp is not None:
            dp.uninstall()
        shutil.rmtree(root, ignore_errors=True)
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], capture_output=True)
            try:
                mounted.rmdir()
            except OSError:
                pass
        try:
            cgroup.rmdir()
        except OSError:
            pass
