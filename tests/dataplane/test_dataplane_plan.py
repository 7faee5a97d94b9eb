"""The pure planner (daemon/dataplane/plan.py) without a kernel: what a plan holds, in which
order, and that planning never changes the mirror it reads."""

from __future__ import annotations

import copy
import os
import random

import pytest

from daemon.dataplane import layout as L
from daemon.dataplane import plan as plan_mod
from daemon.dataplane.apply import apply
from daemon.dataplane.mirror import IdPool, Mirror, Port
from daemon.dataplane.model import Backend, Endpoint, LbMode, Projection, Service, ServicePort, Waypoint
from daemon.dataplane.plan import Plan, make_plan
from daemon.dataplane.render import RECONCILED_MAPS, slot_backend_ids
from daemon.dataplane.types import ReconcileResult


class DictMap:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.d: dict[bytes, bytes] = {}

    def update_raw(self, keys: bytes, values: bytes, n: int) -> None:
        ks, vs = len(keys) // n, len(values) // n
        for i in range(n):
            self.d[bytes(keys[i * ks:(i + 1) * ks])] = bytes(values[i * vs:(i + 1) * vs])

    def delete_batch(self, keys: list[bytes]) -> None:
        for k in keys:
            self.d.pop(k, None)

    def dump(self) -> list[tuple[bytes, bytes]]:
        return list(self.d.items())


LIMITS = {"frontend": 64, "service": 8, "endpoint": 16, "backend": 8, "names": 16}


def backends(n: int) -> dict[str, Backend]:
    return {f"uid/p{i}": Backend(f"uid/p{i}", f"p{i}", "ns", bytes([10, 0, 0, i + 1])) for i in range(n)}


def service(name: str, vip: int, uids: list[str], port: int = 80) -> Service:
    eps = tuple(Endpoint(u, 8080) for u in uids)
    return Service(name, (bytes([10, 96, 0, vip]),), (ServicePort(port, eps),))


def full_plan(m: Mirror, proj: Projection) -> Plan:
    removed = [u for u in m.be_id if u not in proj.backends]
    return make_plan(m, proj, set(proj.services) | set(m.svc_ports), [*proj.backends, *removed], orphans=True)


def run(m: Mirror, maps: dict[str, DictMap], proj: Projection) -> Plan:
    plan = full_plan(m, proj)
    apply(maps, plan, ReconcileResult())
    m.commit(plan, proj)
    return plan


def plain(v: object) -> object:
    """A value-comparable copy: slotted mirror objects become tuples of their fields."""
    if isinstance(v, Port):
        return ("Port", v.id, v.name, v.service, v.value, v.vals, v.fes)
    if isinstance(v, IdPool):
        return ("IdPool", bytes(v.used), set(v.big), list(v.free), v.next)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [plain(x) for x in v]
    return copy.deepcopy(v)


def snapshot(m: Mirror) -> dict:
    return {k: plain(v) for k, v in vars(m).items()}


def new_world() -> tuple[Mirror, dict[str, DictMap]]:
    return Mirror(dict(LIMITS)), {name: DictMap(n) for name, n in LIMITS.items()}


def test_first_plan_writes_in_dependency_order_and_deletes_nothing() -> None:
    m, _ = new_world()
    bes = backends(3)
    proj = Projection({"ns/a": service("ns/a", 1, list(bes))}, bes)
    plan = full_plan(m, proj)
    ops = [(kind, name) for kind, name, _ in plan.ops()]
    assert ops == [("write", "backend"), ("write", "names"), ("write", "endpoint"), ("write", "service"),
                   ("write", "frontend")]
    counts = {name: wr.n for name, wr in plan.write}
    # 3 pod IPs + 1 VIP:port; 3 backend names + 1 service-port name
    assert counts == {"backend": 3, "names": 4, "endpoint": 3, "service": 1, "frontend": 4}
    assert plan.size() == 15 and not plan.rejected


def test_planning_never_changes_the_mirror() -> None:
    m, maps = new_world()
    bes = backends(4)
    run(m, maps, Projection({"ns/a": service("ns/a", 1, ["uid/p0", "uid/p1"])}, bes))
    before = snapshot(m)
    changed = Projection({"ns/b": service("ns/b", 2, ["uid/p2", "uid/p3"])}, backends(5))
    plan = full_plan(m, changed)
    assert plan.size() > 0
    assert snapshot(m) == before
    # and the ids it chose are fresh ones (the pool was not advanced by planning)
    assert plan.be_ids[0] == [5] and plan.svc_ids[0] == [2]


def test_removal_frees_before_writing_and_trims_after() -> None:
    m, maps = new_world()
    bes = backends(3)
    run(m, maps, Projection({"ns/a": service("ns/a", 1, list(bes))}, bes))
    # ns/a goes, ns/b (new VIP, one remaining backend) arrives, two backends go
    keep = {"uid/p2": bes["uid/p2"]}
    plan = full_plan(m, Projection({"ns/b": service("ns/b", 2, ["uid/p2"])}, keep))
    ops = [(kind, name) for kind, name, _ in plan.ops()]
    assert ops == [("delete", "frontend"), ("delete", "service"), ("delete", "endpoint"),
                   ("write", "names"), ("write", "endpoint"), ("write", "service"), ("write", "frontend"),
                   ("delete", "backend"), ("delete", "names")]
    free = dict(plan.free)
    assert len(free["frontend"]) == 3  # ns/a's VIP:port and the two pod IPs
    assert sorted(L.U32.unpack(k)[0] for k in dict(plan.trim)["backend"]) == [1, 2]


def test_service_over_capacity_is_rejected_with_nothing_planned() -> None:
    m, _ = new_world()
    bes = backends(8)
    big = Service("ns/big", (bytes([10, 96, 0, 9]),),
                  (ServicePort(80, tuple(Endpoint(u, p) for u in bes for p in (8080, 9090, 9091))),))
    proj = Projection({"ns/small": service("ns/small", 1, ["uid/p0"]), "ns/big": big}, bes)
    plan = full_plan(m, proj)
    assert set(plan.rejected) == {"ns/big"} and "endpoint map full" in plan.rejected["ns/big"]
    fw = dict(plan.write)["frontend"]
    addrs = {bytes(fw.keys[i * L.FE_KEY.size:i * L.FE_KEY.size + 4]) for i in range(fw.n)}
    assert bytes([10, 96, 0, 9]) not in addrs and bytes([10, 96, 0, 1]) in addrs
    assert len(plan.svc_ids[0]) == 1  # the rejected service's id went back


def test_applied_plan_matches_and_replanning_is_empty() -> None:
    m, maps = new_world()
    bes = backends(4)
    proj = Projection({"ns/a": service("ns/a", 1, ["uid/p0", "uid/p1"]),
                       "ns/b": service("ns/b", 2, ["uid/p1", "uid/p2", "uid/p3"], 443)}, bes)
    run(m, maps, proj)
    assert {n: len(maps[n].d) for n in RECONCILED_MAPS} == m.counts() == {
        "frontend": 6, "service": 2, "endpoint": 5, "backend": 4, "names": 6}
    again = full_plan(m, proj)
    assert again.size() == 0 and not again.rejected
    # a restarted process (mirror loaded from the maps) plans nothing either
    m2 = Mirror(dict(LIMITS))
    m2.load(maps)
    assert full_plan(m2, proj).size() == 0


def test_bulk_first_sync_writes_exactly_what_the_loop_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A first sync packs plain IPv4 backends in bulk; the maps must be byte for byte what the
    per-backend loop writes (names: non-ASCII, and longer than the 255 bytes a name keeps)."""
    limits = {"frontend": 4096, "service": 64, "endpoint": 4096, "backend": 2048, "names": 4096}
    bes = {}
    for i in range(1500):
        name = "pöd" if i == 7 else "p" * 300 if i == 8 else f"p{i}"
        uid = f"Kubernetes//Pod/ns/{name}-{i}"
        bes[uid] = Backend(uid, name, "ns", bytes([10, 1, i >> 8, i & 255]))
    uids = list(bes)
    svcs = {f"ns/s{j}": service(f"ns/s{j}", j + 1, uids[j * 30:(j + 1) * 30]) for j in range(50)}
    proj = Projection(svcs, bes)

    def first_sync() -> tuple[dict[str, dict[bytes, bytes]], Plan]:
        m = Mirror(dict(limits))
        maps = {name: DictMap(n) for name, n in limits.items()}
        plan = run(m, maps, proj)
        return {name: mp.d for name, mp in maps.items()}, plan

    bulk, plan = first_sync()
    assert plan.be_ids[1] == [range(1, 1501)]  # taken in bulk
    monkeypatch.setattr(plan_mod, "_bulk_backends", lambda *a, **k: False)
    loop, plan = first_sync()
    assert not plan.be_ids[1] and len(plan.be_ids[0]) == 1500
    assert bulk == loop
    assert len(bulk["backend"]) == 1500 and len(bulk["names"]) == 1550 and len(bulk["frontend"]) == 1550


def _random_first_sync_input(rng: random.Random, clean: bool) -> tuple[Projection, dict[str, int]]:
    """Services over a few VIPs (collisions between services happen), several ports, endpoint
    columns sorted or not, weights, waypoints, missing backends; limits from roomy to tight.
    clean: none of what makes the bulk stage give up (every VIP distinct, RANDOM, weight 1)."""
    bes = {}
    for i in range(rng.randint(0, 60)):
        uid = f"uid/p{rng.randint(0, 80)}"
        bes[uid] = Backend(uid, f"p{i}", "ns", bytes([10, 1, 0, rng.randint(1, 250)]))
    pool = [*bes, "uid/missing"] if rng.random() < 0.2 and not clean else list(bes)
    svcs = {}
    for j in range(rng.randint(1, 25)):
        name = f"ns/s{rng.randint(0, 40)}"
        ports = []
        for port in rng.sample([80, 443, 8080], rng.choice([1, 1, 1, 2, 3])):
            uids = rng.sample(pool, min(len(pool), rng.randint(0, 12))) if pool else []
            if rng.random() < 0.7:
                uids.sort()
            if rng.random() < 0.1 and not clean:
                ports.append(ServicePort(port, tuple(Endpoint(u, 9000, rng.randint(1, 3)) for u in uids)))
            else:
                tp = rng.choice([8080, 8080, 9090, 0 if not clean else 1])
                ports.append(ServicePort.of(port, tuple(uids), tp))
        if clean:
            vips = (bytes([10, 97, j, 1]), bytes(15) + bytes([j + 1]))[:rng.choice([1, 1, 2])]
        else:
            vips = tuple(bytes([10, 96, 0, rng.randint(1, 30)]) for _ in range(rng.choice([1, 1, 2])))
        wp = Waypoint(bytes([10, 96, 1, 1]), 15008) if rng.random() < 0.05 and not clean else None
        mode = LbMode.FAILOVER if rng.random() < 0.05 and not clean else LbMode.RANDOM
        svcs[name] = Service(name, vips, tuple(ports), mode, wp)
    tight = rng.random() < 0.4
    limits = {"frontend": rng.randint(20, 90) if tight else 4096,
              "service": rng.randint(5, 40) if tight else 4096,
              "endpoint": rng.randint(30, 200) if tight else 4096, "backend": 4096, "names": 4096}
    return Projection(svcs, bes), limits


def _check_refs_and_wants(m: Mirror) -> None:
    """Reference counts and the services naming each backend, recomputed from scratch."""
    refs: dict[int, int] = {}
    for p in m.ports.values():
        for bid in slot_backend_ids(p.vals):
            refs[bid] = refs.get(bid, 0) + 1
    assert {i: n for i, n in enumerate(m.be_refs) if n} == refs
    named: dict[str, set[str]] = {}
    for sname, (svc, _sig) in m.src.items():
        for sp in svc.ports:
            for u in sp.uids:
                named.setdefault(u, set()).add(sname)
    for uid in set(named) | set(m.be_id) | set(m.wants):
        w = m.wanted_by(uid)
        assert (set() if w is None else {w} if isinstance(w, str) else set(w)) == named.get(uid, set()), uid


def _world_state(m: Mirror, maps: dict[str, DictMap], plan: Plan) -> dict:
    used = bytes(m.svc_ids.used).rstrip(b"\0")  # how far the pool grew depends on the path
    return {"maps": {n: mp.d for n, mp in maps.items()}, "rejected": plan.rejected,
            "ports": plain(m.ports), "src": m.src, "fe_owner": m.fe_owner, "be_id": m.be_id,
            "be_refs": list(m.be_refs), "be_want": m.be_want, "wants": m.wants, "counts": m.counts(),
            "svc_used": used, "svc_next": m.svc_ids.next, "svc_free": list(m.svc_ids.free)}


@pytest.mark.parametrize("seed", range(int(os.environ.get("DP_SEEDS", "5")) * 40))
def test_bulk_services_first_sync_matches_the_loop(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first sync's bulk service stage (plan._bulk_services) leaves exactly what the
    per-service loop leaves: maps, rejections (map full, a VIP:port claimed by two services)
    and mirror bookkeeping, and the next pass from either plans the same."""
    rng = random.Random(seed)
    clean = seed % 2 == 0
    proj, limits = _random_first_sync_input(rng, clean)
    used: list[bool] = []
    real = plan_mod._bulk_services

    def spy(*a: object) -> object:
        out = real(*a)  # type: ignore[arg-type]
        used.append(out is not None)
        return out

    def world(bulk: bool) -> tuple[dict, Mirror, dict[str, DictMap]]:
        monkeypatch.setattr(plan_mod, "_bulk_services", spy if bulk else lambda *a: None)
        m = Mirror(dict(limits))
        maps = {name: DictMap(n) for name, n in limits.items()}
        plan = run(m, maps, proj)
        return _world_state(m, maps, plan), m, maps

    fast, m1, maps1 = world(True)
    slow, m2, maps2 = world(False)
    assert fast == slow
    _check_refs_and_wants(m1)
    # and a random change planned from either mirror writes the same
    svcs = dict(proj.services)
    for name in rng.sample(sorted(svcs), len(svcs) // 2):
        del svcs[name]
    nxt = Projection(svcs, dict(list(proj.backends.items())[: len(proj.backends) // 2]))
    p1, p2 = run(m1, maps1, nxt), run(m2, maps2, nxt)
    assert _world_state(m1, maps1, p1) == _world_state(m2, maps2, p2)
    if clean and max(limits.values()) == min(limits.values()):  # roomy: the bulk stage must have run
        assert used == [True]


def test_bulk_services_takes_the_common_first_sync() -> None:
    """10 services x 5 endpoints, sorted columns, RANDOM, weight 1: the bulk stage plans it."""
    bes = backends(50)
    uids = list(bes)
    proj = Projection({f"ns/s{j}": service(f"ns/s{j}", j + 1, sorted(uids[j * 5:(j + 1) * 5]))
                       for j in range(10)}, bes)
    limits = {"frontend": 4096, "service": 64, "endpoint": 4096, "backend": 2048, "names": 4096}
    m = Mirror(dict(limits))
    maps = {name: DictMap(n) for name, n in limits.items()}
    plan = run(m, maps, proj)
    assert plan.svc_ids[1] == [range(1, 11)]  # ids taken as one range: the bulk stage ran
    assert plan.refs_once == range(1, 51) and not plan.refs  # columns are runs of the backends
    _check_refs_and_wants(m)  # (the mirror's bulk commit: every backend named once, ids in order)
    assert not plan.rejected and len(maps["endpoint"].d) == 50 and len(maps["frontend"].d) == 60
    assert full_plan(m, proj).size() == 0


@pytest.mark.parametrize("case", ["runs", "shared", "unnamed", "split"])
def test_bulk_services_runs_of_the_backend_order_match_the_loop(case: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Columns that are runs of the backends' order (services planned in name order, not in
    that order) take the run path: ids without a lookup an endpoint, reference counts as a
    range. A backend named twice, one named by none, or a column that is not one run go the
    lookup way; every case leaves what the per-service loop leaves."""
    bes = backends(60)
    uids = list(bes)
    cols = [uids[j * 5:(j + 1) * 5] for j in range(12)]
    if case == "shared":
        cols[3] = cols[3][:4] + [uids[0]]  # p0 twice, p19 never
    elif case == "unnamed":
        cols[11] = cols[11][:4]  # p59 in no service
    elif case == "split":
        cols[2], cols[3] = cols[2][:3] + cols[3][:2], cols[2][3:] + cols[3][2:]  # same uids, not runs
    names = [f"ns/s{11 - j}" for j in range(12)]  # planned in name order: not the backends' order
    svcs = {n: service(n, j + 1, sorted(c)) for j, (n, c) in enumerate(zip(names, cols, strict=True))}
    proj = Projection(svcs, bes)
    limits = {"frontend": 4096, "service": 64, "endpoint": 4096, "backend": 2048, "names": 4096}

    def world(bulk: bool) -> tuple[dict, Plan]:
        if not bulk:
            monkeypatch.setattr(plan_mod, "_bulk_services", lambda *a: None)
        m = Mirror(dict(limits))
        maps = {name: DictMap(n) for name, n in limits.items()}
        plan = run(m, maps, proj)
        _check_refs_and_wants(m)
        return _world_state(m, maps, plan), plan

    fast, plan = world(True)
    assert plan.svc_ids[1] == [range(1, 13)]  # the bulk stage ran
    assert (plan.refs_once == range(1, 61)) == (case == "runs")
    slow, _ = world(False)
    assert fast == slow


def test_records_v4_agrees_with_the_backend_fields() -> None:
    """_records_v4 (the bulk first sync's check on records' raw slots and shared profiles)
    accepts exactly the workload records that the per-field check accepts, and gives their
    IPv4 addresses; anything that is not a record is left to the per-field check."""
    from daemon.state import WorkloadProfile, WorkloadRecord

    plain = WorkloadProfile("ns", node="n1")
    wp = WorkloadProfile("ns", waypoint=("addr", bytes([10, 1, 1, 1]), 15008))
    proxy = WorkloadProfile("ns", proxy_port=15088)
    v4, v6 = bytes([10, 0, 0, 1]), bytes(range(16))

    def rec(i: int, addrs: tuple[bytes, ...], prof: WorkloadProfile = plain) -> WorkloadRecord:
        return WorkloadRecord(f"Kubernetes//Pod/ns/p{i}", f"p{i}", addrs, prof)

    def by_fields(bs: list) -> list[bytes] | None:
        if any(b.ipv6 is not None or b.waypoint is not None or b.handoff_port for b in bs):
            return None
        return [b.ipv4 for b in bs]

    good = [rec(i, (bytes([10, 0, 1, i]),)) for i in range(5)]
    assert plan_mod._records_v4(good) == by_fields(good) == [b.ipv4 for b in good]
    for odd in (rec(9, (v6,)), rec(9, (v4, v6)), rec(9, ()), rec(9, (v4,), wp), rec(9, (v4,), proxy)):
        bs = [*good, odd]
        assert plan_mod._records_v4(bs) is None
        got = by_fields(bs)
        assert got is None or None in got  # the per-field check refuses it too (or has no IPv4)
    assert plan_mod._records_v4([*good, Backend("u", "p", "ns", v4)]) is None  # not a record


def test_a_pass_shortens_the_gil_switch_interval_and_restores_it() -> None:
    """Writer threads back from a map syscall wait for the GIL at most the switch interval: a
    pass runs with SWITCH_INTERVAL_S and gives the process's own value back, also on failure."""
    import sys

    from daemon.dataplane import reconciler as rmod
    from daemon.dataplane.types import Capacity

    seen: list[float] = []
    fail = []

    class Spy(DictMap):
        def update_raw(self, keys: bytes, values: bytes, n: int) -> None:
            seen.append(sys.getswitchinterval())
            if fail:
                raise OSError(28, "no space")
            super().update_raw(keys, values, n)

    before = sys.getswitchinterval()
    maps = {n: Spy(v) for n, v in LIMITS.items()}
    r = rmod.Reconciler(maps, Capacity())  # type: ignore[arg-type]
    r.sync(Projection(services={"s": service("s", 1, ["uid/p0"])}, backends=backends(1)))
    assert seen and set(seen) == {min(before, rmod.SWITCH_INTERVAL_S)}
    assert sys.getswitchinterval() == before
    fail.append(1)
    with pytest.raises(OSError):
        r.sync(Projection(services={"s": service("s", 1, ["uid/p1"])}, backends=backends(2)))
    assert sys.getswitchinterval() == before
