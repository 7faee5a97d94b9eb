"""The State's compact stores against a fresh rebuild: a service's members (a list while small,
a dict from 32 on) and the column-form endpoints of the cached projection.

Random batches of adds, updates (address, capacity, port list, health) and removals, over
services that grow past the list/dict threshold and shrink again: after every batch the cached
projection must equal the projection a fresh State computes from the resources held, and
``members`` / ``member_records`` must list exactly the workloads naming each service, in uid order.
"""

from __future__ import annotations

import random

import pytest
from xds_helpers import apply, name_of, projection_of, service, svc_key, workload

from daemon.dataplane.model import Endpoint
from daemon.state import State
from daemon.xds.gen.istio.workload import workload_pb2 as wl

SERVICES = ("a", "b", "c")


def _random_workload(rnd: random.Random, i: int) -> wl.Address:
    names = rnd.sample(SERVICES, rnd.choice([1, 1, 1, 2]))
    services = {svc_key(s): ([(80, rnd.choice([9090, 9191]))] if rnd.random() < 0.2 else []) for s in names}
    return workload(f"w{i}", f"10.1.{i // 250}.{i % 250 + 1}" if rnd.random() < 0.97 else None,
                    services=services, healthy=rnd.random() < 0.9,
                    capacity=rnd.choice([None, None, None, 2, 0]))


@pytest.mark.parametrize("seed", range(6))
def test_incremental_projection_equals_a_fresh_one(seed: int) -> None:
    rnd = random.Random(seed)
    st = State()
    held: dict[str, bytes] = {}

    def put(*addrs: wl.Address, removed: tuple[str, ...] = ()) -> None:
        apply(st, *addrs, removed=removed)
        for n in removed:
            held.pop(n, None)
        for a in addrs:
            held[name_of(a)] = a.SerializeToString()

    put(*(service(s, vip=f"10.96.0.{k + 1}", ports=[(80, 8080), (81, 0)]) for k, s in enumerate(SERVICES)))
    most = 0
    for _ in range(12):
        batch = [_random_workload(rnd, rnd.randrange(150)) for _ in range(rnd.randrange(1, 60))]
        uniq = {name_of(a): a for a in batch}
        gone = tuple(rnd.sample(sorted(set(held) - {svc_key(s) for s in SERVICES}),
                                min(rnd.randrange(0, 15), max(0, len(held) - 3))))
        put(*(a for n, a in uniq.items() if n not in gone), removed=gone)
        got = st.projection()
        want = projection_of(held)
        assert got == want
        for s in SERVICES:
            key = svc_key(s)
            naming = sorted(u for u in st.workloads if key in st.workloads[u].services)
            most = max(most, len(naming))
            assert st.members(key) == naming
            assert [w.uid for w in st.member_records(key)] == naming
            for sp in got.services[key].ports:  # every reader's view agrees with the columns
                assert sp.endpoints == tuple(Endpoint(*r) for r in sp.rows())
    assert most > 32  # the dict form was exercised


def test_a_big_push_leaves_member_lists_exact() -> None:
    """A push of >= 1024 workloads copies the member lists it grew by append to their exact size
    (10 in 16 slots otherwise), keeping members and the projection as they were."""
    import sys

    st = State()
    n_svc, per = 150, 10
    svcs = [service(f"s{s}", vip=f"10.96.{s // 250}.{s % 250 + 1}", ports=[(80, 8080)]) for s in range(n_svc)]
    held = {name_of(a): a.SerializeToString() for a in svcs}
    apply(st, *[wl.Address.FromString(v) for v in held.values()])
    pods = [workload(f"w{i}", f"10.1.{i // 250}.{i % 250 + 1}", services={svc_key(f"s{i // per}"): []})
            for i in range(n_svc * per)]
    held.update((name_of(a), a.SerializeToString()) for a in pods)
    apply(st, *pods)
    for s in range(n_svc):
        m = st._members[svc_key(f"s{s}")]
        assert isinstance(m, list) and sys.getsizeof(m) == sys.getsizeof(list(range(per)))
        assert st.members(svc_key(f"s{s}")) == sorted(f"Kubernetes//Pod/default/w{i}"
                                                      for i in range(s * per, (s + 1) * per))
    assert st.projection() == projection_of(held)
