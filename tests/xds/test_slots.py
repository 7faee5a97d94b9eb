"""The map comparison used by the xds tests is exact: weighted slots, RANDOM/STRICT priorities.

``dp_compare.expected`` restates the data plane's slot rules; the first test pins it to hand-
computed rows, the property test checks it against the real maps for random projections that
the xDS state never produces itself (RANDOM or STRICT endpoints at non-zero priorities, weights
that need scaling, endpoints without a target port, dual-stack backends), through a full sync
followed by an incremental update.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from dp_compare import actual, expected, slots_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.dataplane.model import Backend, Endpoint, LbMode, Projection, Service, ServicePort

UIDS = [f"Kubernetes//Pod/slots/b{i}" for i in range(6)]


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def backend(i: int, family: str = "v4") -> Backend:
    v4 = ip(f"10.21.0.{i + 1}") if family in ("v4", "dual") else None
    v6 = ip(f"fd00:21::{i + 1}") if family in ("v6", "dual") else None
    return Backend(UIDS[i], f"b{i}", "slots", v4, v6)


def test_expected_rows_by_hand() -> None:
    assert slots_for([2, 4, 6]) == [1, 2, 3] and slots_for([40, 1]) == [16, 1] and slots_for([0, 3]) == [1, 3]
    eps = (Endpoint(UIDS[1], 8080, 4, 2), Endpoint(UIDS[0], 8080, 2, 0), Endpoint(UIDS[2], 0, 5, 0))
    bes = {u: backend(i) for i, u in enumerate(UIDS[:3])}
    vip = (ip("10.97.0.1"),)
    for mode, rows, counts in (
        (LbMode.RANDOM, [(0, 0, 0), (0, 1, 1), (0, 2, 1)], (3, 0, 0, 0, 0, 0, 0)),  # all at prio 0, 1:2
        (LbMode.STRICT, [(0, 0, 0)], (1, 0, 0, 0, 0, 0, 0)),  # prio 2 dropped
        (LbMode.FAILOVER, [(0, 0, 0), (2, 0, 1)], (1, 0, 1, 0, 0, 0, 0)),  # each priority on its own
    ):
        got = expected(Projection({"ns/a": Service("ns/a", vip, (ServicePort(80, eps),), mode)}, bes))
        assert got["endpoints"] == {("ns/a", 80, p, s, UIDS[b], 8080) for p, s, b in rows}, mode
        assert got["headers"] == {("ns/a", 80, mode.name, counts)}
    headless = expected(Projection({"ns/h": Service("ns/h", (), (ServicePort(80, eps),))}, bes))
    assert headless["endpoints"] == set() and headless["headers"] == set()


@st.composite
def projections(draw: Any) -> Projection:
    families = draw(st.lists(st.sampled_from(["v4", "v6", "dual"]), min_size=6, max_size=6))
    present = draw(st.sets(st.integers(0, 5)))
    backends = {UIDS[i]: backend(i, families[i]) for i in sorted(present)}
    services = {}
    for s in range(draw(st.integers(0, 3))):
        name = f"slots/s{s}.slots.svc.cluster.local"
        ports = []
        for port in draw(st.lists(st.sampled_from([80, 443, 8080]), min_size=1, max_size=2, unique=True)):
            eps = draw(st.dictionaries(
                st.sampled_from(sorted(present)),
                st.tuples(st.sampled_from([8080, 9090, 0]), st.sampled_from([1, 2, 3, 4, 6, 40, 0]),
                          st.integers(0, 6)), max_size=6)) if present else {}
            ports.append(ServicePort(port, tuple(Endpoint(UIDS[i], tp, w, prio)
                                                 for i, (tp, w, prio) in sorted(eps.items()))))
        vips = (ip(f"10.97.{s}.1"),) + ((ip(f"fd00:97::{s + 1}"),) if draw(st.booleans()) else ())
        services[name] = Service(name, vips, tuple(ports), draw(st.sampled_from(list(LbMode))))
    return Projection(services, backends)


def _changed(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


@pytest.mark.kernel
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=projections(), second=projections())
def test_maps_hold_exactly_the_expected_slots(first: Projection, second: Projection,
                                              xds_dataplane: Any) -> None:
    dp = xds_dataplane
    res = dp.sync(first)
    assert not res.rejected
    assert actual(dp.read_back()) == expected(first)
    res = dp.update(second, _changed(first.services, second.services),
                    _changed(first.backends, second.backends))
    assert not res.rejected
    assert actual(dp.read_back()) == expected(second)
