"""The compact ServicePort (uids + shared or per-endpoint columns) against its Endpoint form.

``ServicePort`` keeps columns instead of Endpoint objects (memory at 100k workloads); these
check that every way of reading it (``endpoints``, ``rows``, ``uniform``, equality, hash) and
``render_port`` (the planner's compact read) agree with the plain Endpoint tuples it replaces.
"""

from __future__ import annotations

import pickle

from hypothesis import given
from hypothesis import strategies as st

from daemon.dataplane.model import Endpoint, LbMode, ServicePort
from daemon.dataplane.render import render_port, render_slots

UIDS = [f"Kubernetes//Pod/rp/b{i}" for i in range(8)]

endpoint_lists = st.lists(
    st.builds(Endpoint, st.sampled_from(UIDS), st.sampled_from([8080, 9090, 0, 70000]),
              st.sampled_from([1, 2, 3, 40, 0]), st.integers(0, 6)),
    max_size=8, unique_by=lambda e: e.backend_uid)


@given(eps=endpoint_lists, port=st.sampled_from([80, 443]))
def test_columns_round_trip(eps: list[Endpoint], port: int) -> None:
    sp = ServicePort(port, eps)
    assert sp.endpoints == tuple(eps) and sp.port == port
    assert sp.rows() == [(e.backend_uid, e.target_port, e.weight, e.priority) for e in eps]
    assert sp.uids == tuple(e.backend_uid for e in eps)
    same = len({(e.target_port, e.weight, e.priority) for e in eps}) <= 1
    assert (sp.uniform is not None) == same
    cols = ServicePort.of(port, sp.uids, sp.column("target_port"), sp.column("weight"), sp.column("priority"))
    assert cols == sp and hash(cols) == hash(sp)  # a tuple column equal to an int one folds to it
    assert pickle.loads(pickle.dumps(sp)) == sp
    if eps:
        other = ServicePort(port, [*eps[:-1], Endpoint(eps[-1].backend_uid, eps[-1].target_port + 1,
                                                        eps[-1].weight, eps[-1].priority)])
        assert other != sp


@given(eps=endpoint_lists, lb=st.sampled_from(list(LbMode)),
       ids=st.lists(st.one_of(st.none(), st.integers(1, 1000)), min_size=8, max_size=8))
def test_render_port_equals_render_slots(eps: list[Endpoint], lb: LbMode, ids: list[int | None]) -> None:
    sp = ServicePort(80, eps)
    bids = ids[:len(eps)]
    want = render_slots(lb, [(e.backend_uid, e.target_port, e.weight, e.priority, bid)
                             for e, bid in zip(eps, bids, strict=True)
                             if bid is not None and 0 < e.target_port < 65536])
    assert render_port(lb, sp, bids) == want


def test_empty_and_uniform_ports() -> None:
    assert ServicePort(80) == ServicePort(80, ()) == ServicePort.of(80, (), 0)
    assert ServicePort(80).endpoints == () and ServicePort(80).uniform == (0, 1, 0)
    sp = ServicePort.of(80, (UIDS[0], UIDS[1]), 8080, 2, 1)
    assert sp.endpoints == (Endpoint(UIDS[0], 8080, 2, 1), Endpoint(UIDS[1], 8080, 2, 1))
    assert sp.endpoints is sp.endpoints  # materialized once
    assert ServicePort.of(80, (UIDS[0],), 8080) != ServicePort.of(81, (UIDS[0],), 8080)


def test_equal_service_headers_are_one_object() -> None:
    from daemon.dataplane import layout as L

    a = render_slots(LbMode.RANDOM, [(UIDS[0], 8080, 1, 0, 1), (UIDS[1], 8080, 1, 0, 2)])[0]
    b = render_slots(LbMode.RANDOM, [(UIDS[2], 9090, 1, 0, 3), (UIDS[3], 9090, 1, 0, 4)])[0]
    assert a is b and L.SVC_VAL.unpack(a)[:3] == (0, 2, 0)
    c = render_slots(LbMode.FAILOVER, [(UIDS[0], 8080, 2, 1, 1), (UIDS[1], 8080, 1, 3, 2)])[0]
    d = render_slots(LbMode.FAILOVER, [(UIDS[2], 8080, 2, 1, 5), (UIDS[3], 8080, 1, 3, 6)])[0]
    assert c is d and L.SVC_VAL.unpack(c)[:8] == (int(LbMode.FAILOVER), 0, 1, 0, 1, 0, 0, 0)
