"""Translation at connect(): VIP -> backend, v4 and v6, getpeername, enrolment."""

from __future__ import annotations

import pytest
from dp_topo import VIP4, VIP6, ip4

pytestmark = pytest.mark.kernel


def test_vip_reaches_backend_port_8080(dp, topology) -> None:
    r = topology.client("c1", f"{VIP4}:80", n=30)
    assert r["ok"] == 30, r
    assert set(r["counts"]) <= {"s1", "s2", "s3"} and len(r["counts"]) >= 2, r


def test_getpeername_returns_vip(dp, topology) -> None:
    r = topology.client("c1", f"{VIP4}:80", n=5)
    assert r["ok"] == 5 and r["peers"] == [f"{VIP4}:80"], r


def test_ipv6_vip(dp, topology) -> None:
    r = topology.client("c1", f"[{VIP6}]:80", n=20)
    assert r["ok"] == 20, r
    assert set(r["counts"]) <= {"s1", "s2", "s3"}, r
    assert r["peers"] == [f"{VIP6}:80"], r


def test_unmanaged_netns_not_translated(dp, topology) -> None:
    r = topology.client("c2", f"{VIP4}:80", n=3, timeout=1)
    assert r["ok"] == 0 and "unreachable" in " ".join(r["errors"]).lower(), r
    # its other traffic is unaffected, even inside the attached cgroup
    r = topology.client("c2", f"{ip4('s1')}:8080", n=3)
    assert r["ok"] == 3 and r["counts"] == {"s1": 3}, r


def test_disable_stops_translation(dp, topology) -> None:
    from daemon.dataplane import control_connect

    assert topology.client("c1", f"{VIP4}:80")["ok"] == 1
    control_connect(topology.ns_path("c1"), False, cgroup=topology.cgroup)
    r = topology.client("c1", f"{VIP4}:80", timeout=1)
    assert r["ok"] == 0, r
    control_connect(topology.ns_path("c1"), True, ipv6=True, cgroup=topology.cgroup)
    assert topology.client("c1", f"{VIP4}:80")["ok"] == 1


def test_v4_mapped_destination_on_dual_stack_socket(dp, topology) -> None:
    r = topology.client("c1", f"[::ffff:{VIP4}]:80", n=10)
    assert r["ok"] == 10 and set(r["counts"]) <= {"s1", "s2", "s3"}, r
    assert r["peers"] == [f"::ffff:{VIP4}:80"], r


def test_direct_pod_access_is_not_rewritten(dp, topology) -> None:
    r = topology.client("c1", f"{ip4('s2')}:8080", n=5)
    assert r["counts"] == {"s2": 5} and r["peers"] == [f"{ip4('s2')}:8080"], r
