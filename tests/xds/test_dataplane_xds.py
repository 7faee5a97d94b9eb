"""End to end: sandbox pilot -> XdsClient -> State -> DataplaneSync -> real BPF maps."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from dp_compare import actual, endpoint_targets, expected
from sandbox_env import Env, pod_body, service_body, set_pod_status

from daemon.state import State
from daemon.wiring import DataplaneSync

pytestmark = pytest.mark.kernel
NS = "maps"


@pytest.fixture
def synced(pilot_env: Env, xds_dataplane: Any) -> Iterator[tuple[Any, State, DataplaneSync]]:
    client, st = pilot_env.client()
    sync = DataplaneSync(st, xds_dataplane)
    yield client, st, sync
    client.stop()
    sync.stop()


def converged(st: State, sync: DataplaneSync, dp: Any) -> bool:
    if not sync.flush(10):
        return False
    return actual(dp.read_back()) == expected(st.projection())


def test_maps_follow_pods_and_services(pilot_env: Env, xds_dataplane: Any, synced: Any) -> None:
    env, dp = pilot_env, xds_dataplane
    client, st, sync = synced
    env.core.create_namespace({"metadata": {"name": NS}})
    ports = [{"port": 80, "targetPort": 8080}]
    env.core.create_namespaced_service(NS, service_body("api", {"app": "api"}, ports))
    for i in range(3):
        env.core.create_namespaced_pod(NS, pod_body(f"api-{i}", {"app": "api"}))
        set_pod_status(env.core, NS, f"api-{i}", f"10.7.0.{i + 1}", ready=i != 1)
    name = f"{NS}/api.{NS}.svc.cluster.local"
    wait_for(lambda: name in st.services and converged(st, sync, dp), what="maps converge")
    vip = str(ipaddress.ip_address(st.services[name].vips[0]))
    got = actual(dp.read_back())
    assert (vip, 80, name) in got["frontends"]
    eps = endpoint_targets(got, name)
    # api-1 is not Ready: a backend, but no endpoint
    assert eps == {f"Kubernetes//Pod/{NS}/api-0": 8080, f"Kubernetes//Pod/{NS}/api-2": 8080}
    assert (f"Kubernetes//Pod/{NS}/api-1", "10.7.0.2", None) in got["backends"]
    # scale down + delete: removals reach the maps
    env.core.delete_namespaced_pod("api-0", NS)
    wait_for(lambda: f"Kubernetes//Pod/{NS}/api-0" not in st.workloads and converged(st, sync, dp),
             what="pod removal in maps")
    assert not any(b[0].endswith("/api-0") for b in actual(dp.read_back())["backends"])
    env.core.delete_namespaced_service("api", NS)
    wait_for(lambda: name not in st.services and converged(st, sync, dp), what="service removal in maps")
    assert not any(f[2] == name for f in actual(dp.read_back())["frontends"])
    assert sync.status()["syncs"] >= 1 and sync.status()["updates"] >= 1 and not sync.status()["last_error"]


def test_auth_failure_leaves_maps_untouched(pilot_env: Env, xds_dataplane: Any, synced: Any,
                                            tmp_path: Path) -> None:
    client, st, sync = synced
    wait_for(lambda: client.status()["ready"] and converged(st, sync, xds_dataplane), what="baseline")
    before = xds_dataplane.read_back()
    bad_client, bad_state = pilot_env.client(cluster_id="not-this-cluster")
    bad_sync = DataplaneSync(bad_state, xds_dataplane)
    try:
        wait_for(lambda: bad_client.status()["reconnects"] >= 3, what="rejected retries")
        assert bad_client.status()["last_error"].startswith("UNAUTHENTICATED")
        assert bad_sync.flush(5) and bad_sync.status()["syncs"] == 0
        assert xds_dataplane.read_back() == before
    finally:
        bad_client.stop()
        bad_sync.stop()


def test_pilot_restart_removes_stale_entries_from_maps(pilot_env: Env, xds_dataplane: Any,
                                                       synced: Any) -> None:
    env, dp = pilot_env, xds_dataplane
    client, st, sync = synced
    ns = "maps-restart"
    env.core.create_namespace({"metadata": {"name": ns}})
    env.core.create_namespaced_service(ns, service_body("q", {"app": "q"}, [{"port": 6379}]))
    for i in range(2):
        env.core.create_namespaced_pod(ns, pod_body(f"q-{i}", {"app": "q"}))
        set_pod_status(env.core, ns, f"q-{i}", f"10.8.0.{i + 1}", ready=True)
    wait_for(lambda: len(st.members(f"{ns}/q.{ns}.svc.cluster.local")) == 2 and converged(st, sync, dp),
             what="initial")
    env.pilot.kill()
    env.core.delete_namespaced_pod("q-0", ns)
    env.core.delete_namespaced_service("q", ns)
    env.pilot.start()
    wait_for(lambda: f"Kubernetes//Pod/{ns}/q-0" not in st.workloads and converged(st, sync, dp),
             timeout=20, what="stale entries gone")
    got = actual(dp.read_back())
    assert not any(b[0].endswith("/q-0") for b in got["backends"])
    assert not any(f[2].startswith(f"{ns}/") for f in got["frontends"])
    assert sync.status()["syncs"] >= 2  # the resynced stream triggered a full sync (GC path)
