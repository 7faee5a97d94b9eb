"""The mirror's compact bookkeeping (mirror.py) against a brute-force recomputation.

The mirror keeps no per-pod key objects and no uid-keyed reverse index for backends in the maps:
pod-IP frontend owners are keyed by the Backend's own address bytes and "which services name
this backend" lives in an id-indexed list. These tests recompute both from what the mirror
already records (its services' last inputs, its backends) after random changes, and check that
a big first sync shares the projection's objects instead of making new ones.
"""

from __future__ import annotations

import os
import random

import pytest
from test_dataplane_reconciler import PODS, ROOMY, TIGHT, World, rand_backend, rand_service

from daemon.dataplane import layout as L
from daemon.dataplane.mirror import Mirror, fe_token, pod_tokens, token_key
from daemon.dataplane.model import Backend, Endpoint, Projection, Service, ServicePort
from daemon.dataplane.plan import make_plan
from daemon.dataplane.reconciler import Reconciler
from daemon.dataplane.render import V4MAPPED, encode_name, fe_key
from daemon.dataplane.types import Capacity

SEEDS = int(os.environ.get("DP_SEEDS", "5"))


def assert_bookkeeping(m: Mirror) -> None:
    named: dict[str, set[str]] = {}
    for sname, (svc, _sig) in m.src.items():
        for sp in svc.ports:
            for e in sp.endpoints:
                named.setdefault(e.backend_uid, set()).add(sname)
    uids = set(named) | set(m.be_id) | set(m.wants)
    for uid in uids:
        w = m.wanted_by(uid)
        got = set() if w is None else {w} if isinstance(w, str) else set(w)
        assert got == named.get(uid, set()), uid
        assert not isinstance(w, set) or len(w) > 1, uid  # one service is kept as a str
    assert not m.wants.keys() & m.be_id.keys()
    for uid, bid in m.be_id.items():
        assert m.backend_uid(bid) == uid
    for bid, w in enumerate(m.be_want):
        assert w is None or m.backend_of(bid) is not None, bid
    names = [n for s in m.svc_ports for n in m.port_names(s)]
    assert sorted(names) == sorted(m.ports)
    assert all(isinstance(v, str) or len(v) > 1 for v in m.svc_ports.values())
    assert all(p.name in m.port_names(p.service) for p in m.ports.values())
    for tok, code in m.fe_owner.items():
        if code > 0:
            assert len(tok) in (4, 16), tok
            b = m.backend_of(code)
            assert b is not None and tok in pod_tokens(b), (tok, code)
        else:
            assert len(tok) == 20 and tok in m.port_by_id[-code].fes


def v4mapped_backend(rng: random.Random, pod: str) -> Backend:
    i = int(pod[1:])
    return Backend(f"uid/{pod}", pod, "ns", None, V4MAPPED + bytes([10, 0, rng.choice([0, 1]), i + 1]))


@pytest.mark.parametrize(("seed", "cap"),
                         [(s, TIGHT) for s in range(SEEDS)] + [(s, ROOMY) for s in range(SEEDS)])
def test_random_changes_keep_bookkeeping(seed: int, cap: Capacity) -> None:
    rng = random.Random(1000 + seed)
    world = World(cap)
    rec = Reconciler(world.maps, cap)
    rec.load()
    proj = Projection()
    for _step in range(100):
        changed_s: set[str] = set()
        changed_b: set[str] = set()
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.4:
                pod = rng.choice(PODS)
                uid = f"uid/{pod}"
                if uid in proj.backends and rng.random() < 0.4:
                    del proj.backends[uid]
                else:
                    make = v4mapped_backend if rng.random() < 0.15 else rand_backend
                    proj.backends[uid] = make(rng, pod)
                changed_b.add(uid)
            else:
                name = f"ns/svc{rng.randint(0, 8)}"
                if name in proj.services and rng.random() < 0.25:
                    del proj.services[name]
                else:
                    proj.services[name] = rand_service(rng, name, [f"uid/{p}" for p in PODS], 12)
                changed_s.add(name)
        if rng.random() < 0.1:
            rec = Reconciler(world.maps, cap)
            rec.load()
        if rng.random() < 0.3:
            rec.sync(proj)
        else:
            rec.update(proj, changed_s, changed_b)
        assert_bookkeeping(rec.mirror)


def test_first_sync_shares_the_projections_objects() -> None:
    """A bulk first sync keys pod owners by the Backends' own ipv4 objects (no new key object per
    pod) and fills the service index by id; an update that moves a backend keeps both right."""
    n = 3000
    cap = Capacity(frontends=2 * n, services=n, endpoints=4 * n, backends=2 * n, manage=4, sockets=4)
    world = World(cap)
    rec = Reconciler(world.maps, cap)
    bes = {f"uid/p{i}": Backend(f"uid/p{i}", f"p{i}", "ns", bytes([10, 1, i >> 8, i & 255]))
           for i in range(n)}
    svcs = {}
    for j in range(n // 10):
        eps = tuple(Endpoint(f"uid/p{10 * j + k}", 8080) for k in range(10))
        svcs[f"ns/s{j}"] = Service(f"ns/s{j}", (bytes([10, 96, j >> 8, j & 255]),), (ServicePort(80, eps),))
    proj = Projection(svcs, bes)
    rec.sync(proj)
    m = rec.mirror
    pods = {tok: code for tok, code in m.fe_owner.items() if code > 0}
    assert len(pods) == n
    by_ip = {b.ipv4: b for b in bes.values()}
    assert all(tok is by_ip[tok].ipv4 for tok in pods)  # the very objects, not copies
    assert m.wants == {}
    assert m.wanted_by("uid/p15") == "ns/s1"
    assert_bookkeeping(m)
    # p15 moves to another IP and a second service names it; p16 goes away
    bes["uid/p15"] = Backend("uid/p15", "p15", "ns", bytes([10, 2, 0, 15]))
    del bes["uid/p16"]
    svcs["ns/x"] = Service("ns/x", (bytes([10, 97, 0, 1]),), (ServicePort(80, (Endpoint("uid/p15", 80),)),))
    rec.update(proj, ["ns/x"], ["uid/p15", "uid/p16"])
    assert m.wanted_by("uid/p15") == {"ns/s1", "ns/x"}
    assert m.wanted_by("uid/p16") == "ns/s1"  # named, without an id now
    assert "uid/p16" in m.wants
    assert bytes([10, 1, 0, 15]) not in m.fe_owner and bytes([10, 2, 0, 15]) in m.fe_owner
    assert_bookkeeping(m)
    # it comes back: the index entry moves back under its id
    bes["uid/p16"] = Backend("uid/p16", "p16", "ns", bytes([10, 1, 0, 16]))
    rec.update(proj, [], ["uid/p16"])
    assert "uid/p16" not in m.wants and m.wanted_by("uid/p16") == "ns/s1"
    assert_bookkeeping(m)


def test_first_sync_with_shared_backends_indexes_every_service() -> None:
    """A backend named by two services, and by two ports of one service, on a first sync."""
    cap = Capacity(frontends=64, services=16, endpoints=64, backends=16, manage=4, sockets=4)
    rec = Reconciler(World(cap).maps, cap)
    bes = {f"uid/p{i}": Backend(f"uid/p{i}", f"p{i}", "ns", bytes([10, 1, 0, i + 1])) for i in range(4)}
    e = {u: Endpoint(u, 8080) for u in bes}
    a = Service("ns/a", (bytes([10, 96, 0, 1]),), (ServicePort(80, (e["uid/p0"], e["uid/p1"])),))
    b = Service("ns/b", (bytes([10, 96, 0, 2]),), (ServicePort(80, (e["uid/p1"], e["uid/p2"])),))
    p3 = (e["uid/p3"],)
    c = Service("ns/c", (bytes([10, 96, 0, 3]),), (ServicePort(80, p3), ServicePort(443, p3)))
    rec.sync(Projection({s.name: s for s in (a, b, c)}, bes))
    m = rec.mirror
    assert m.wanted_by("uid/p0") == "ns/a"
    assert m.wanted_by("uid/p1") == {"ns/a", "ns/b"}
    assert m.wanted_by("uid/p3") == "ns/c"
    assert_bookkeeping(m)


def test_owner_tokens_round_trip_and_foreign_keys_stay_keys() -> None:
    v4, v6, mapped = bytes([10, 0, 0, 1]), bytes(15) + b"\x05", V4MAPPED + bytes([10, 0, 0, 1])
    for addr, n in ((v4, 4), (v6, 16), (mapped, 4)):
        k = fe_key(addr, 0)
        t = fe_token(k)
        assert len(t) == n and token_key(t) == k
        assert fe_token(fe_key(addr, 80)) == fe_key(addr, 80)  # a VIP:port is its own token
    assert pod_tokens(Backend("u", ipv4=v4, ipv6=mapped)) == [v4]  # one frontend, as be_keys()
    assert pod_tokens(Backend("u", ipv4=bytes([127, 0, 0, 1]), ipv6=v6)) == [v6]
    odd = bytearray(fe_key(v4, 0))
    odd[7] = 1  # not a key fe_key() makes: never mistaken for the pod's own
    assert fe_token(bytes(odd)) == bytes(odd)


def test_bulk_first_sync_names_match_encode_name() -> None:
    """The bulk path packs names a chunk at a time: long and non-ASCII names are cut as
    encode_name() cuts them (bytes, the last one NUL)."""
    n = 5000  # more than one chunk
    cap = Capacity(frontends=2 * n, services=8, endpoints=8, backends=2 * n, manage=4, sockets=4)
    world = World(cap)
    rec = Reconciler(world.maps, cap)
    bes = {}
    for i in range(n):
        uid = f"uid/p{i}" + ("x" * 300 if i == 7 else "") + ("é" * 200 if i == 4500 else "")
        name = f"pöd-{i}" if i % 1000 == 3 else f"p{i}"
        bes[uid] = Backend(uid, name, "ns", bytes([10, 2, i >> 8, i & 255]))
    proj = Projection({}, bes)
    assert len(make_plan(Mirror(rec.limits), proj, set(), list(bes), True).bulk_src) == n  # the bulk path
    rec.sync(proj)
    m = rec.mirror
    assert m.wants == {} and len(m.be_id) == n
    names = world.data["names"]
    for uid, bid in m.be_id.items():
        b = bes[uid]
        assert names[L.NAME_KEY.pack(L.NAME_BACKEND, bid)] == encode_name(uid, b.name, b.namespace), uid
