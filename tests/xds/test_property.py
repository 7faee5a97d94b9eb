"""Property: any sequence of adds/updates/removals with disconnects ends with maps == projection.

The server is the real delta ADS server; disconnects stop it (the client backs off, keeps its
cache, reconnects and resyncs with initial_resource_versions) while changes keep happening.
The reference is a fresh State fed exactly the server's final resources. With root the live
BPF maps are compared too (Dataplane.read_back via DataplaneSync); otherwise the projection.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from conftest import AdsHarness, wait_for
from dp_compare import actual, expected
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xds_helpers import service, svc_key, workload

from daemon.state import State
from daemon.wiring import DataplaneSync
from daemon.xds.client import XdsClient, XdsConfig
from daemon.xds.gen.istio.workload import workload_pb2 as wl
from daemon.xds.resources import ADDRESS_TYPE, decode_address

LB = wl.LoadBalancing
NODE, LOCALITY = "n1", ("r1", "z1", "")
SVC_VARIANTS = [
    dict(ports=[(80, 8080)]),
    dict(ports=[(80, 0), (443, 8443)]),
    dict(ports=[(80, 9090)], mode=LB.FAILOVER, routing=[LB.REGION, LB.ZONE]),
    dict(ports=[(80, 8080)], mode=LB.STRICT, routing=[LB.NODE]),
    dict(ports=[(80, 8080)], health=LB.ALLOW_ALL),
    dict(ports=[(80, 8080), (81, 0)], routing=[LB.REGION, LB.ZONE]),  # RANDOM: ranks are ignored
    dict(ports=[(80, 8080)], mode=LB.STRICT, routing=[LB.REGION]),  # STRICT: other regions dropped
]
CAPACITIES = [None, 1, 2, 3, 0, 40]  # weights > 1 expand to slots (40 is scaled down to 16)
LOCALITIES = [("r1", "z1", ""), ("r1", "z2", ""), ("r2", "z1", "")]

ops = st.lists(st.one_of(
    st.tuples(st.just("svc"), st.integers(0, 3), st.integers(0, len(SVC_VARIANTS) - 1), st.integers(0, 2)),
    st.tuples(st.just("rm_svc"), st.integers(0, 3)),
    st.tuples(st.just("wl"), st.integers(0, 5), st.integers(0, 3),
              st.frozensets(st.integers(0, 3), max_size=3), st.booleans(), st.booleans(), st.integers(0, 2),
              st.integers(0, len(CAPACITIES) - 1)),
    st.tuples(st.just("rm_wl"), st.integers(0, 5)),
    st.tuples(st.just("down"), st.integers(1, 3)),
    st.tuples(st.just("settle")),
    st.tuples(st.just("settle")),
), min_size=1, max_size=16)


def resource(op: tuple) -> tuple[str, bytes]:
    if op[0] == "svc":
        _, i, variant, vip = op
        a = service(f"s{i}", vip=f"10.96.{vip}.{i + 1}", **SVC_VARIANTS[variant])
        return svc_key(f"s{i}"), a.SerializeToString()
    _, j, ipv, svcs, healthy, own_port, loc, cap = op
    ports = [(80, 7000 + j)] if own_port else []
    a = workload(f"w{j}", f"10.9.{ipv}.{j + 1}", services={svc_key(f"s{i}"): ports for i in sorted(svcs)},
                 healthy=healthy, node=NODE if j % 2 == 0 else "n2", locality=LOCALITIES[loc],
                 capacity=CAPACITIES[cap])
    return a.workload.uid, a.SerializeToString()


def reference(store_snapshot: dict[str, tuple[str, bytes]]) -> Any:
    ref = State(node_name=NODE, locality=LOCALITY)
    ref.apply_addresses([decode_address(n, ADDRESS_TYPE, v) for n, (_, v) in store_snapshot.items()])
    return ref.projection()


@pytest.fixture(scope="module")
def maybe_dataplane(request: pytest.FixtureRequest) -> Any:
    if os.geteuid() != 0:
        return None
    return request.getfixturevalue("xds_dataplane")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=ops, honor_versions=st.booleans())
def test_random_changes_and_disconnects_converge(sequence: list[tuple], honor_versions: bool,
                                                 maybe_dataplane: Any) -> None:
    ads = AdsHarness()
    ads.honor_versions = honor_versions  # istiod master skips what the client has; <= 1.30 resends all
    ads.start()
    state = State(node_name=NODE, locality=LOCALITY)
    client = XdsClient(XdsConfig(address=ads.address, plaintext=True, pod_name="p", pod_namespace="ns",
                                 initial_backoff_s=0.02, max_backoff_s=0.1), state)
    sync = DataplaneSync(state, maybe_dataplane) if maybe_dataplane is not None else None
    client.start()
    down_for = 0
    try:
        assert client.ready_event.wait(10)
        for op in sequence:
            if op[0] == "settle":  # let the client catch up, so later changes arrive as deltas
                if ads.server is not None:
                    now = reference(ads.store.snapshot(ADDRESS_TYPE))
                    wait_for(lambda now=now: state.projection() == now, timeout=15, what="settle")
                continue
            if op[0] == "down":
                if ads.server is not None:
                    ads.stop()
                down_for = op[1]
                continue
            if op[0] == "rm_svc":
                ads.store.update(ADDRESS_TYPE, removed=[svc_key(f"s{op[1]}")])
            elif op[0] == "rm_wl":
                ads.store.update(ADDRESS_TYPE, removed=[f"Kubernetes//Pod/default/w{op[1]}"])
            else:
                name, raw = resource(op)
                ads.store.update(ADDRESS_TYPE, {name: raw})
            if down_for:
                down_for -= 1
                if not down_for:
                    ads.start()
        if ads.server is None:
            ads.start()
        want = reference(ads.store.snapshot(ADDRESS_TYPE))
        wait_for(lambda: client.status()["ready"] and state.projection() == want, timeout=15,
                 what="client state == final server state")
        if sync is not None:
            wait_for(lambda: sync.status()["synced"], what="first full sync")
            assert sync.flush(15), sync.status()
            assert actual(maybe_dataplane.read_back()) == expected(want)
            assert not sync.status()["last_error"]
        assert client.status()["nacks"] == 0
    finally:
        client.stop()
        if sync is not None:
            sync.stop()
        ads.stop()
