"""Endpoint choice: uniform and weighted splits (chi-square), STRICT / FAILOVER, endpoint removal."""

from __future__ import annotations

import time

import pytest
from dp_topo import VIP4, backends, ep, service

from daemon.dataplane.model import LbMode, Projection

pytestmark = pytest.mark.kernel

N = 600
# chi-square critical values at p = 0.001 (a correct implementation fails 1 run in 1000)
CHI2_DF1 = 10.83
CHI2_DF2 = 13.82


def chi2(counts: dict[str, int], expected: dict[str, float]) -> float:
    return sum((counts.get(k, 0) - e) ** 2 / e for k, e in expected.items())


def with_services(dp, *services) -> None:
    proj = Projection({s.name: s for s in services}, backends())
    before = time.monotonic()
    res = dp.sync(proj)
    assert not res.rejected, res
    # when the last write returned: within the call, before the bookkeeping that followed it
    assert before < res.maps_written_monotonic <= time.monotonic()


def test_uniform_split_chi_square(dp, topology) -> None:
    r = topology.client("c1", f"{VIP4}:80", n=N)
    assert r["ok"] == N, r
    stat = chi2(r["counts"], {"s1": N / 3, "s2": N / 3, "s3": N / 3})
    assert stat < CHI2_DF2, (stat, r["counts"])


def test_weighted_2_to_1_chi_square(dp, topology) -> None:
    with_services(dp, service("default/web", (VIP4,), [ep("s1", weight=2), ep("s2", weight=1)]))
    r = topology.client("c1", f"{VIP4}:80", n=N)
    assert r["ok"] == N and set(r["counts"]) == {"s1", "s2"}, r
    stat = chi2(r["counts"], {"s1": N * 2 / 3, "s2": N / 3})
    assert stat < CHI2_DF1, (stat, r["counts"])
    # and the uniform hypothesis is clearly rejected for the same data
    assert chi2(r["counts"], {"s1": N / 2, "s2": N / 2}) > CHI2_DF1


def test_strict_uses_only_local_priority(dp, topology) -> None:
    strict = service("default/web", (VIP4,), [ep("s1", priority=0), ep("s2", priority=1)], lb=LbMode.STRICT)
    with_services(dp, strict)
    r = topology.client("c1", f"{VIP4}:80", n=40)
    assert r["counts"] == {"s1": 40}, r
    # no priority-0 endpoint left: the connect is left untranslated (the VIP has no route here)
    with_services(dp, service("default/web", (VIP4,), [ep("s2", priority=1)], lb=LbMode.STRICT))
    r = topology.client("c1", f"{VIP4}:80", n=3, timeout=1)
    assert r["ok"] == 0 and "unreachable" in " ".join(r["errors"]).lower(), r


def test_failover_picks_lowest_nonempty_priority(dp, topology) -> None:
    eps = [ep("s2", priority=1), ep("s3", priority=2)]
    with_services(dp, service("default/web", (VIP4,), eps, lb=LbMode.FAILOVER))
    r = topology.client("c1", f"{VIP4}:80", n=40)
    assert r["counts"] == {"s2": 40}, r
    with_services(dp, service("default/web", (VIP4,), eps[1:], lb=LbMode.FAILOVER))
    r = topology.client("c1", f"{VIP4}:80", n=40)
    assert r["counts"] == {"s3": 40}, r
    # a better priority appearing wins again
    with_services(dp, service("default/web", (VIP4,), [ep("s1", priority=0), *eps], lb=LbMode.FAILOVER))
    r = topology.client("c1", f"{VIP4}:80", n=40)
    assert r["counts"] == {"s1": 40}, r


def test_endpoint_removal_effective_next_connect(dp, topology) -> None:
    base = service("default/web", (VIP4,), [ep("s1"), ep("s2"), ep("s3")])
    with_services(dp, base)
    proj = Projection({base.name: service("default/web", (VIP4,), [ep("s1"), ep("s3")])}, backends())
    res = dp.update(proj, services=["default/web"], backends=[])
    assert res.written >= 1 and not res.rejected
    r = topology.client("c1", f"{VIP4}:80", n=100)
    assert r["ok"] == 100 and "s2" not in r["counts"], r
    # the backend itself going away (workload deleted) is handled by update() on the backend alone
    bes = backends()
    del bes["Kubernetes//Pod/default/s3"]
    proj = Projection({base.name: service("default/web", (VIP4,), [ep("s1"), ep("s3")])}, bes)
    dp.update(proj, services=[], backends=["Kubernetes//Pod/default/s3"])
    r = topology.client("c1", f"{VIP4}:80", n=50)
    assert r["counts"] == {"s1": 50}, r
    names = {b["uid"] for b in dp.read_back()["backends"]}
    assert "Kubernetes//Pod/default/s3" not in names
