"""A batch of new workloads (a first push) goes into the State in bulk (State._put_new_workloads);
it must leave exactly what the per-record loop leaves: the stores, the members in their order
(lists up to 32, then dicts), the waypoint indexes, the node locality, the change and the
projection. Random batches mix what the bulk path takes with what it must hand to the loop
(known uids, duplicates, address-less and multi-address workloads)."""

from __future__ import annotations

import os
import random

import pytest

from daemon.state import Change, State, WorkloadProfile, WorkloadRecord

NODE = "node-1"


def _profiles(rnd: random.Random) -> list[WorkloadProfile]:
    out = []
    for i in range(12):
        svcs = tuple((f"ns/s{j}.svc", ((80, 8080),)) for j in rnd.sample(range(6), rnd.choice([0, 1, 1, 2])))
        wp = rnd.choice([None, None, None, ("addr", bytes([10, 9, 9, 9]), 15008),
                         ("host", "ns/s1.svc", 15008)])
        out.append(WorkloadProfile("ns", node=rnd.choice(["node-0", NODE]), locality=(f"r{i % 2}", "z", ""),
                                   services=svcs, waypoint=wp))
    return out


def _batch(rnd: random.Random, profs: list[WorkloadProfile], held: list[str], start: int
           ) -> list[WorkloadRecord]:
    recs: list[WorkloadRecord] = []
    i = start
    odd = 0.0 if rnd.random() < 0.5 else 1.0  # half the batches are clean (all new, one address)
    size = rnd.choice([10, 70, 200])
    while len(recs) < size:
        prof = rnd.choice(profs)
        for _ in range(rnd.randint(1, 40)):  # replicas arrive together, as a push lists them
            i += 1
            uid = f"Kubernetes//Pod/ns/p{i}"
            roll = rnd.random()
            if roll < 0.02 * odd and held:
                uid = rnd.choice(held)  # an update of a known workload
            elif roll < 0.03 * odd and recs:
                uid = recs[-1].uid  # the same uid twice in one response
            addrs: tuple[bytes, ...] = (bytes([10, 1, (i >> 8) & 255, i & 255]),)
            if rnd.random() < 0.02 * odd:
                addrs = ()
            elif rnd.random() < 0.02 * odd:
                addrs = (*addrs, bytes(15) + b"\x01")
            recs.append(WorkloadRecord(uid, f"p{i}", addrs, prof))
    return recs


def _snapshot(st: State, ch: Change) -> tuple:
    members = {k: (list(map(id, v)) if isinstance(v, list) else ("dict", list(v), list(map(id, v.values()))))
               for k, v in st._members.items()}
    proj = st.projection()
    return (list(st.workloads), list(map(id, st.workloads.values())), members, st._addressless,
            st._wp_uids, st._wp_workloads, st._locality, st._locality_uid if st._locality else None,
            ch.services, ch.backends, ch.workloads, proj)


@pytest.mark.parametrize("seed", range(int(os.environ.get("DP_SEEDS", "1")) * 20))
def test_bulk_put_equals_the_loop(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(seed)
    profs = _profiles(rnd)
    bulk, loop = State(node_name=NODE), State(node_name=NODE)
    taken = []
    real = State._put_new_workloads

    def spy(self: State, recs: list[WorkloadRecord], change: Change) -> bool:
        ok = real(self, recs, change)
        taken.append(ok)
        return ok

    monkeypatch.setattr(State, "_put_new_workloads", spy)
    n = 0
    for _ in range(8):
        recs = _batch(rnd, profs, list(bulk.workloads), n)
        n += len(recs) + 50
        a, b = Change(), Change()
        bulk._put_workloads(recs, a)
        loop._put_each_workload(recs, b)
        bulk._dirty |= a.services
        loop._dirty |= b.services
        assert _snapshot(bulk, a) == _snapshot(loop, b)
    assert len(taken) == 8 and any(taken)


def test_a_first_push_takes_the_bulk_path() -> None:
    prof = WorkloadProfile("ns", services=(("ns/a.svc", ((80, 8080),)),))
    recs = [WorkloadRecord(f"Kubernetes//Pod/ns/p{i}", f"p{i}", (bytes([10, 1, 0, i]),), prof)
            for i in range(100)]
    st, ch = State(), Change()
    assert st._put_new_workloads(recs, ch)
    members = st._members["ns/a.svc"]
    assert isinstance(members, dict) and list(members) == [r.uid for r in recs]
    assert not st._put_new_workloads(recs, Change())  # known uids: the loop's case


def test_a_bulk_push_leaves_member_lists_exact_without_a_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists built by the bulk path are at their exact size (the trim pass is skipped then), also
    when a later batch of the same response extends them; a removal brings the trim back."""
    import sys

    profs = [WorkloadProfile("ns", services=((f"ns/s{i}.svc", ((80, 8080),)),)) for i in range(300)]
    recs = [WorkloadRecord(f"Kubernetes//Pod/ns/p{i}", f"p{i}", (bytes([10, 1, i >> 8, i & 255]),),
                           profs[(i // 5) % 300]) for i in range(3000)]  # each service: runs of 5, twice
    trims: list[int] = []
    real = State._trim_members
    monkeypatch.setattr(State, "_trim_members", lambda self, t: (trims.append(len(t)), real(self, t))[1])
    st = State()
    st.apply_address_batches([recs[:1500], recs[1500:]])
    assert trims == []
    lists = [m for m in st._members.values() if isinstance(m, list)]
    assert len(lists) == 300 and all(len(m) == 10 for m in lists)
    assert all(sys.getsizeof(m) == sys.getsizeof(m[:]) for m in lists)
    more = [WorkloadRecord(f"Kubernetes//Pod/ns/q{i}", f"q{i}", (bytes([10, 2, i >> 8, i & 255]),), profs[0])
            for i in range(1100)]
    st.apply_address_batches([more], removed=[recs[0].uid])
    assert trims == [1]  # the one service touched (the removed pod's and the new ones' share it)
