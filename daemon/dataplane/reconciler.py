"""Desired Projection -> the minimal set of map writes, in an order that is always safe.

In memory the reconciler mirrors what it believes the kernel maps hold (``load()`` rebuilds that
mirror from the maps and the pinned names table, so a new process picks up where the last one
stopped). A reconcile pass diffs a scope of services/backends against the mirror and executes:

  phase 1 (free)  delete frontends no longer wanted, then service entries and all endpoint slots
                  of service ports that are gone (nothing points at them once their frontends are)
  phase 2 (write) backends, names, endpoint slots, service headers (counts), frontends
  phase 3 (trim)  delete endpoint slots beyond the new counts, then backends nobody references

so a frontend never points at a missing service, a count never covers a missing slot and a slot
never names a missing backend. Capacity is checked before anything is written; a service that
does not fit is skipped whole and reported, its previous entries (if any) stay as they were.

Endpoint weights: a service port's weights are divided by their gcd and an endpoint gets that
many slots, scaled down so no endpoint has more than MAX_SLOTS_PER_ENDPOINT (16); a uniform pick
of a slot in the kernel is then a weighted pick (exact when the reduced weights are <= 16).
Slots are ordered by (backend uid, target port), so the same input always gives the same slots.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import reduce
from math import gcd
from typing import Protocol

from daemon.dataplane import layout as L
from daemon.dataplane.model import MAX_PRIORITY, Backend, LbMode, Projection, Service
from daemon.dataplane.types import Capacity, ReconcileResult

log = logging.getLogger(__name__)

MAX_SLOTS_PER_ENDPOINT = 16
RECONCILED_MAPS = ("frontend", "service", "endpoint", "backend", "names")
V4MAPPED = b"\0" * 10 + b"\xff\xff"


class MapLike(Protocol):
    max_entries: int

    def update_batch(self, keys: list[bytes], values: list[bytes]) -> None: ...
    def delete_batch(self, keys: list[bytes]) -> None: ...
    def dump(self) -> list[tuple[bytes, bytes]]: ...


def slot_counts(weights: list[int]) -> list[int]:
    """Slots per endpoint for these capacity weights (see module docstring)."""
    ws = [max(1, int(w)) for w in weights]
    if not ws:
        return []
    g = reduce(gcd, ws)
    ws = [w // g for w in ws]
    top = max(ws)
    if top > MAX_SLOTS_PER_ENDPOINT:
        ws = [max(1, round(w * MAX_SLOTS_PER_ENDPOINT / top)) for w in ws]
    return ws


def fe_key(addr: bytes, port: int) -> bytes:
    """Frontend key of an address (4 or 16 bytes; v4-mapped v6 is folded to v4) and port."""
    if len(addr) == 16 and addr[:12] == V4MAPPED:
        addr = addr[12:]
    if len(addr) == 4:
        return L.FE_KEY.pack(addr, port.to_bytes(2, "big"), L.AF_INET, 0)
    if len(addr) == 16:
        return L.FE_KEY.pack(addr, port.to_bytes(2, "big"), L.AF_INET6, 0)
    raise ValueError(f"address must be 4 or 16 bytes, got {len(addr)}")


def encode_name(*parts: str) -> bytes:
    raw = "\0".join(parts).encode()
    return L.NAME_VAL.pack(raw[: L.NAME_LEN - 1])


def decode_name(value: bytes) -> list[str]:
    return value.rstrip(b"\0").decode(errors="replace").split("\0")


class _IdPool:
    """Small integer ids >= 1, reusing freed ones."""

    def __init__(self) -> None:
        self.used: set[int] = set()
        self.free: list[int] = []
        self.next = 1

    def take(self) -> int:
        while self.free:
            i = self.free.pop()
            if i not in self.used:
                self.used.add(i)
                return i
        while self.next in self.used:
            self.next += 1
        i = self.next
        self.next += 1
        self.used.add(i)
        return i

    def mark(self, i: int) -> None:
        self.used.add(i)

    def release(self, i: int) -> None:
        if i in self.used:
            self.used.discard(i)
            self.free.append(i)


@dataclass
class _Port:
    """Applied (or planned) state of one service port."""

    id: int
    name: str  # "ns/host:port"
    service: str
    value: bytes = b""  # km_service value; b"" = not in the map
    slots: dict[bytes, bytes] = field(default_factory=dict)  # km_endpoint key -> value
    fes: dict[bytes, bytes] = field(default_factory=dict)  # km_frontend key -> value
    bids: frozenset[int] = frozenset()  # backend ids the slots reference
    named: bool = False  # names entry present


@dataclass
class _Back:
    id: int
    uid: str
    value: bytes = b""
    fes: dict[bytes, bytes] = field(default_factory=dict)
    name: bytes = b""  # names value as written; b"" = absent


@dataclass
class _Plan:
    p1: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    p2: dict[str, tuple[list[bytes], list[bytes]]] = field(
        default_factory=lambda: defaultdict(lambda: ([], [])))
    p3: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))

    def write(self, name: str, key: bytes, value: bytes) -> None:
        ks, vs = self.p2[name]
        ks.append(key)
        vs.append(value)


def _port_name(service: str, port: int) -> str:
    return f"{service}:{port}"


class Reconciler:
    """Owns the contents of km_frontend, km_service, km_endpoint, km_backend and km_names."""

    def __init__(self, maps: Mapping[str, MapLike], capacity: Capacity) -> None:
        self.maps = maps
        self.cap = capacity
        self.limits = {
            "frontend": maps["frontend"].max_entries,
            "service": maps["service"].max_entries,
            "endpoint": maps["endpoint"].max_entries,
            "backend": maps["backend"].max_entries,
            "names": maps["names"].max_entries,
        }
        self._reset()

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        self.ports: dict[str, _Port] = {}
        self.svc_ports: dict[str, set[str]] = defaultdict(set)
        self.backs: dict[str, _Back] = {}
        self.port_by_id: dict[int, _Port] = {}
        self.back_by_id: dict[int, _Back] = {}
        self.fe_owner: dict[bytes, tuple[int, int]] = {}
        self.users: dict[int, set[str]] = defaultdict(set)  # backend id -> port names using it
        self.orphans: dict[str, list[bytes]] = defaultdict(list)
        self.svc_ids = _IdPool()
        self.be_ids = _IdPool()
        self.dirty = False
        # entries per map held by named owners (frontends are len(fe_owner)); orphans added on top
        self._n = {"service": 0, "endpoint": 0, "backend": 0, "names": 0}
        # last rendered input per service / backend: an unchanged input is skipped cheaply
        self._src: dict[str, tuple[Service, tuple[int | None, ...]]] = {}
        self._bsrc: dict[str, Backend] = {}
        # backend uid -> services whose last rendered input names it (present or not)
        self._wants: dict[str, set[str]] = defaultdict(set)
        self._synced = False  # update() before the first sync() after load() does a full sync
        self._held: list[tuple[_IdPool, int]] = []  # orphan ids reserved until their cleanup

    def counts(self) -> dict[str, int]:
        """Entries per reconciled map, as the mirror knows them."""
        out = {"frontend": len(self.fe_owner) + len(self.orphans["frontend"])}
        for m, n in self._n.items():
            out[m] = n + len(self.orphans[m])
        return out

    def load(self) -> None:
        """Rebuild the mirror from the live maps; entries nobody can name become orphans."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._load()
        finally:
            if enabled:
                gc.enable()

    def _load(self) -> None:
        self._reset()
        names: dict[tuple[int, int], bytes] = {
            L.NAME_KEY.unpack(k): v for k, v in self.maps["names"].dump()}
        services = {L.U32.unpack(k)[0]: v for k, v in self.maps["service"].dump()}
        backends = {L.U32.unpack(k)[0]: v for k, v in self.maps["backend"].dump()}
        slots: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        for k, v in self.maps["endpoint"].dump():
            slots[L.EP_KEY.unpack(k)[0]][k] = v
        fes = self.maps["frontend"].dump()

        used_names: set[tuple[int, int]] = set()
        for sid in set(services) | set(slots):
            nm = names.get((L.NAME_SERVICE, sid))
            parts = decode_name(nm)[0].rsplit(":", 1) if nm else []
            if len(parts) != 2 or not parts[1].isdigit() or decode_name(nm)[0] in self.ports:
                if sid in services:
                    self.orphans["service"].append(L.U32.pack(sid))
                self.orphans["endpoint"].extend(slots.get(sid, {}))
                self._hold(self.svc_ids, sid)
                continue
            used_names.add((L.NAME_SERVICE, sid))
            p = _Port(sid, decode_name(nm)[0], parts[0], services.get(sid, b""), slots.get(sid, {}),
                      named=True)
            p.bids = frozenset(L.EP_VAL.unpack(v)[0] for v in p.slots.values())
            self._add_port(p)
        for bid, val in backends.items():
            nm = names.get((L.NAME_BACKEND, bid))
            uid = decode_name(nm)[0] if nm else ""
            if not uid or uid in self.backs:
                self.orphans["backend"].append(L.U32.pack(bid))
                self._hold(self.be_ids, bid)
                continue
            used_names.add((L.NAME_BACKEND, bid))
            self._add_back(_Back(bid, uid, val, name=nm or b""))
        for key in names:
            if key not in used_names:
                self.orphans["names"].append(L.NAME_KEY.pack(*key))
                self._hold(self.svc_ids if key[0] == L.NAME_SERVICE else self.be_ids, key[1])
        for k, v in fes:
            kind, oid = L.FE_VAL.unpack(v)
            owner = self.port_by_id.get(oid) if kind == L.FE_SERVICE else \
                self.back_by_id.get(oid) if kind == L.FE_BACKEND else None
            if owner is None:
                self.orphans["frontend"].append(k)
                if kind == L.FE_SERVICE:
                    self._hold(self.svc_ids, oid)
                continue
            owner.fes[k] = v
            self.fe_owner[k] = (kind, oid)

    def _add_port(self, p: _Port) -> None:
        self.ports[p.name] = p
        self.svc_ports[p.service].add(p.name)
        self.port_by_id[p.id] = p
        self.svc_ids.mark(p.id)
        for bid in p.bids:
            self.users[bid].add(p.name)
        self._n["service"] += 1 if p.value else 0
        self._n["endpoint"] += len(p.slots)
        self._n["names"] += 1 if p.named else 0

    def _drop_port(self, p: _Port) -> None:
        self.ports.pop(p.name, None)
        names = self.svc_ports.get(p.service)
        if names is not None:
            names.discard(p.name)
            if not names:
                del self.svc_ports[p.service]
        self.port_by_id.pop(p.id, None)
        for bid in p.bids:
            self.users[bid].discard(p.name)
        for k in p.fes:
            if self.fe_owner.get(k) == (L.FE_SERVICE, p.id):
                del self.fe_owner[k]
        self._n["service"] -= 1 if p.value else 0
        self._n["endpoint"] -= len(p.slots)
        self._n["names"] -= 1 if p.named else 0

    def _add_back(self, b: _Back) -> None:
        self.backs[b.uid] = b
        self.back_by_id[b.id] = b
        self.be_ids.mark(b.id)
        self._n["backend"] += 1 if b.value else 0
        self._n["names"] += 1 if b.name else 0

    def _drop_back(self, b: _Back) -> None:
        self.backs.pop(b.uid, None)
        self.back_by_id.pop(b.id, None)
        for k in b.fes:
            if self.fe_owner.get(k) == (L.FE_BACKEND, b.id):
                del self.fe_owner[k]
        self._n["backend"] -= 1 if b.value else 0
        self._n["names"] -= 1 if b.name else 0

    def _hold(self, pool: _IdPool, i: int) -> None:
        """Keep an orphan's id out of circulation until sync() has deleted the orphan: reusing it
        earlier would let the phase-3 orphan delete hit the new owner's entry."""
        if i not in pool.used:
            pool.mark(i)
            self._held.append((pool, i))

    def _claim(self, key: bytes, owner: tuple[int, int]) -> None:
        """Record a frontend key's new owner; a previous owner's mirror forgets it."""
        prev = self.fe_owner.get(key)
        if prev is not None and prev != owner:
            o = self.port_by_id.get(prev[1]) if prev[0] == L.FE_SERVICE else self.back_by_id.get(prev[1])
            if o is not None:
                o.fes.pop(key, None)
        self.fe_owner[key] = owner

    def _forget_src(self, sname: str) -> None:
        old = self._src.pop(sname, None)
        if old is None:
            return
        for sp in old[0].ports:
            for e in sp.endpoints:
                names = self._wants.get(e.backend_uid)
                if names is not None:
                    names.discard(sname)
                    if not names:
                        del self._wants[e.backend_uid]

    # ------------------------------------------------------------ rendering
    @staticmethod
    def _render_backend(b: Backend) -> bytes:
        flags = (L.BE_HAS_V4 if b.ipv4 else 0) | (L.BE_HAS_V6 if b.ipv6 else 0)
        return L.BE_VAL.pack(b.ipv4 or b"\0" * 4, b.ipv6 or b"\0" * 16, flags)

    def _render_slots(self, sid: int, lb: LbMode, endpoints: list[tuple[str, int, int, int, int]]
                      ) -> tuple[bytes, dict[bytes, bytes], frozenset[int]]:
        """endpoints: (uid, target_port, weight, priority, backend id) -> header, slots, backend ids."""
        by_prio: dict[int, list[tuple[str, int, int, int]]] = defaultdict(list)
        for uid, port, weight, prio, bid in endpoints:
            if lb == LbMode.RANDOM:
                prio = 0
            elif lb == LbMode.STRICT and prio != 0:
                continue
            by_prio[min(max(prio, 0), MAX_PRIORITY)].append((uid, port, weight, bid))
        counts = [0] * L.PRIOS
        slots: dict[bytes, bytes] = {}
        bids: set[int] = set()
        for prio, eps in by_prio.items():
            eps.sort()
            n = 0
            for (_uid, port, _w, bid), reps in zip(eps, slot_counts([e[2] for e in eps]), strict=True):
                val = L.EP_VAL.pack(bid, port.to_bytes(2, "big"), 0)
                bids.add(bid)
                for _ in range(reps):
                    slots[L.EP_KEY.pack(sid, prio, n)] = val
                    n += 1
            counts[prio] = n
        return L.SVC_VAL.pack(int(lb), *counts, 0), slots, frozenset(bids)

    # ------------------------------------------------------------ reconcile
    def sync(self, projection: Projection) -> ReconcileResult:
        if self.dirty:
            self.load()
        res = self._reconcile(projection, set(projection.services) | set(self.svc_ports),
                              set(projection.backends) | set(self.backs), orphans=True)
        self._synced = True
        return res

    def update(self, projection: Projection, services: Iterable[str], backends: Iterable[str]
               ) -> ReconcileResult:
        if self.dirty:
            self.load()
        if not self._synced:
            return self.sync(projection)
        svc_scope = set(services)
        be_scope = set(backends)
        for uid in be_scope:
            # a backend appearing, going or changing id: re-render every service that names it
            svc_scope.update(self._wants.get(uid, ()))
            cur = self.backs.get(uid)
            if cur is not None and uid not in projection.backends:
                svc_scope.update(self.ports[n].service for n in self.users.get(cur.id, ()) if n in self.ports)
        return self._reconcile(projection, svc_scope, be_scope, orphans=False)

    def _reconcile(self, proj: Projection, svc_scope: set[str], be_scope: set[str], orphans: bool
                   ) -> ReconcileResult:
        # hundreds of thousands of small objects: keep the cyclic GC from rescanning them mid-pass
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._reconcile_inner(proj, svc_scope, be_scope, orphans)
        finally:
            if enabled:
                gc.enable()

    def _reconcile_inner(self, proj: Projection, svc_scope: set[str], be_scope: set[str], orphans: bool
                         ) -> ReconcileResult:
        t0 = time.perf_counter()
        res = ReconcileResult()
        plan = _Plan()
        usage = self.counts()
        new_ports: dict[str, _Port | None] = {}  # port name -> planned state (None = removed)
        new_backs: dict[str, _Back | None] = {}
        allocated: list[tuple[_IdPool, int]] = []

        if orphans:
            for name in ("frontend", "service", "endpoint"):
                plan.p1[name].extend(self.orphans[name])
                usage[name] -= len(self.orphans[name])
            plan.p3["backend"].extend(self.orphans["backend"])
            plan.p3["names"].extend(self.orphans["names"])

        # --- what each in-scope service wants, and which frontend keys get released
        wanted_ports: dict[str, dict[str, tuple[Service, int]]] = {}
        for sname in sorted(svc_scope):
            svc = proj.services.get(sname)
            want: dict[str, tuple[Service, int]] = {}
            if svc is not None and svc.vips:
                for i, sp in enumerate(svc.ports):
                    want.setdefault(_port_name(sname, sp.port), (svc, i))
            wanted_ports[sname] = want
        released: set[bytes] = set()
        for sname, want in wanted_ports.items():
            for pname in self.svc_ports.get(sname, set()) - set(want):
                released.update(self.ports[pname].fes)
            for pname, (svc, i) in want.items():
                cur = self.ports.get(pname)
                if cur is not None:
                    keep = {fe_key(v, svc.ports[i].port) for v in svc.vips}
                    released.update(k for k in cur.fes if k not in keep)
        for uid in be_scope:
            cur = self.backs.get(uid)
            if cur is None:
                continue
            b = proj.backends.get(uid)
            keep = {fe_key(ip, 0) for ip in ((b.ipv4, b.ipv6) if b else ()) if ip}
            released.update(k for k in cur.fes if k not in keep)

        pass_claims: dict[bytes, tuple[int, int]] = {}  # keys accepted for an owner in this pass
        claim_names: dict[bytes, str] = {}

        def owner_name(key: bytes) -> str:
            kind, oid = self.fe_owner.get(key, (0, 0))
            if kind == L.FE_SERVICE and oid in self.port_by_id:
                return self.port_by_id[oid].name
            return self.back_by_id[oid].uid if oid in self.back_by_id else f"#{oid}"

        def claimable(key: bytes, me: tuple[int, int]) -> bool:
            if pass_claims.get(key, me) != me:
                return False
            owner = self.fe_owner.get(key)
            return owner is None or owner == me or key in released

        def owned(keys: Iterable[bytes], me: tuple[int, int]) -> list[bytes]:
            return [k for k in keys if self.fe_owner.get(k) == me]

        def drop_port(cur: _Port, count_usage: bool = True) -> None:
            new_ports[cur.name] = None
            plan.p1["frontend"].extend(owned(cur.fes, (L.FE_SERVICE, cur.id)))
            if cur.value:
                plan.p1["service"].append(L.U32.pack(cur.id))
            plan.p1["endpoint"].extend(cur.slots)
            if count_usage:
                usage["frontend"] -= len(cur.fes)
                usage["service"] -= 1 if cur.value else 0
                usage["endpoint"] -= len(cur.slots)
            if cur.named:
                plan.p3["names"].append(L.NAME_KEY.pack(L.NAME_SERVICE, cur.id))

        # --- services removed whole (phase 1; frees capacity for what follows)
        for sname, want in wanted_ports.items():
            if not want:
                for pname in sorted(self.svc_ports.get(sname, set())):
                    drop_port(self.ports[pname])

        # --- backends (adds and changes; removals are decided after the services)
        removed_backs: list[_Back] = []
        bid_override: dict[str, int | None] = {}  # in-scope backends whose id changes in this pass
        new_bsrc: dict[str, Backend] = {}

        def live_bid(uid: str) -> int | None:
            if uid in bid_override:
                return bid_override[uid]
            cur = self.backs.get(uid)
            return cur.id if cur is not None else None

        for uid in sorted(be_scope):
            cur = self.backs.get(uid)
            b = proj.backends.get(uid)
            if b is None:
                if cur is not None:
                    removed_backs.append(cur)
                    bid_override[uid] = None
                continue
            if cur is not None and self._bsrc.get(uid) == b:
                continue  # unchanged since we last wrote it
            bad = _bad_backend(b)
            if bad:
                res.rejected[f"backend/{uid}"] = bad
                bid_override[uid] = None if cur is None else cur.id
                continue
            if cur is None:
                bid = self.be_ids.take()
                allocated.append((self.be_ids, bid))
            else:
                bid = cur.id
            value = self._render_backend(b)
            name = encode_name(uid, b.name, b.namespace)
            fes = {k: L.FE_VAL.pack(L.FE_BACKEND, bid)
                   for k in (fe_key(ip, 0) for ip in (b.ipv4, b.ipv6) if ip)
                   if claimable(k, (L.FE_BACKEND, bid))}
            if cur is not None and cur.value == value and cur.name == name and cur.fes == fes:
                new_bsrc[uid] = b  # already in the maps exactly so (e.g. first sync after a restart)
                for k in fes:
                    pass_claims[k] = (L.FE_BACKEND, bid)
                    claim_names[k] = uid
                continue
            need = {"backend": 0 if cur and cur.value else 1, "names": 0 if cur and cur.name else 1,
                    "frontend": sum(1 for k in fes if k not in (cur.fes if cur else {}))}
            full = [m for m, n in need.items() if usage[m] + n > self.limits[m]]
            if full:
                res.rejected[f"backend/{uid}"] = f"{full[0]} map full ({self.limits[full[0]]} entries)"
                if cur is None:
                    self.be_ids.release(bid)
                    allocated.remove((self.be_ids, bid))
                bid_override[uid] = None if cur is None else cur.id
                continue
            for m, n in need.items():
                usage[m] += n
            bid_override[uid] = bid
            new_bsrc[uid] = b
            for k in fes:
                pass_claims[k] = (L.FE_BACKEND, bid)
                claim_names[k] = uid
            if cur is None or cur.value != value:
                plan.write("backend", L.U32.pack(bid), value)
            if cur is None or cur.name != name:
                plan.write("names", L.NAME_KEY.pack(L.NAME_BACKEND, bid), name)
            for k, v in fes.items():
                if cur is None or cur.fes.get(k) != v:
                    plan.write("frontend", k, v)
            if cur is not None:
                plan.p1["frontend"].extend(owned((k for k in cur.fes if k not in fes), (L.FE_BACKEND, bid)))
            new_backs[uid] = _Back(bid, uid, value, fes, name)

        # --- services: kept and new ports
        new_src: dict[str, tuple[Service, tuple[int | None, ...]]] = {}
        for sname, want in wanted_ports.items():
            if not want:
                continue
            svc = proj.services[sname]
            sig = (svc, tuple(live_bid(e.backend_uid) for sp in svc.ports for e in sp.endpoints))
            if self._src.get(sname) == sig:
                continue  # same input, same backend ids: nothing to write
            staged: list[tuple[str, _Port, _Port | None]] = []
            need: dict[str, int] = defaultdict(int)
            reason = ""
            dropped = [self.ports[n] for n in sorted(self.svc_ports.get(sname, set()) - set(want))]
            for cur in dropped:
                need["frontend"] -= len(cur.fes)
                need["service"] -= 1 if cur.value else 0
                need["endpoint"] -= len(cur.slots)
            bad = _bad_service(svc)
            if bad:
                res.rejected[sname] = bad
                continue
            for pname, (svc_, i) in sorted(want.items()):
                sp = svc_.ports[i]
                cur = self.ports.get(pname)
                if cur is None:
                    sid = self.svc_ids.take()
                    allocated.append((self.svc_ids, sid))
                else:
                    sid = cur.id
                eps = [(e.backend_uid, e.target_port, e.weight, e.priority, bid)
                       for e in sp.endpoints
                       if 0 < e.target_port < 65536 and (bid := live_bid(e.backend_uid)) is not None]
                value, slots, bids = self._render_slots(sid, svc.lb_mode, eps)
                fes: dict[bytes, bytes] = {}
                for vip in svc.vips:
                    k = fe_key(vip, sp.port)
                    if not claimable(k, (L.FE_SERVICE, sid)):
                        other = claim_names.get(k) or owner_name(k)
                        reason = f"frontend {_fmt_fe(k)} already belongs to {other}"
                        break
                    fes[k] = L.FE_VAL.pack(L.FE_SERVICE, sid)
                if reason:
                    break
                old = cur or _Port(sid, pname, sname)
                need["service"] += 0 if old.value else 1
                need["names"] += 0 if old.named else 1
                need["endpoint"] += sum(1 for k in slots if k not in old.slots)
                need["frontend"] += sum(1 for k in fes if k not in old.fes)
                staged.append((pname, _Port(sid, pname, sname, value, slots, fes, bids, True), cur))
            if not reason:
                full = [m for m, n in need.items() if usage[m] + n > self.limits[m]]
                if full:
                    reason = (f"{full[0]} map full: needs {need[full[0]]} more, "
                              f"{self.limits[full[0]] - usage[full[0]]} of {self.limits[full[0]]} free")
            if reason:
                res.rejected[sname] = reason
                for _pname, p, cur in staged:
                    if cur is None:
                        self.svc_ids.release(p.id)
                        allocated.remove((self.svc_ids, p.id))
                continue
            new_src[sname] = sig
            same = all(cur is not None and cur.named and cur.value == p.value and cur.slots == p.slots
                       and cur.fes == p.fes for _pname, p, cur in staged)
            if same and not dropped:
                for pname, p, _cur in staged:  # already in the maps exactly so
                    for k in p.fes:
                        pass_claims[k] = (L.FE_SERVICE, p.id)
                        claim_names[k] = pname
                continue
            for cur in dropped:
                drop_port(cur, count_usage=False)  # already in `need`
            for m, n in need.items():
                usage[m] += n
            for pname, p, cur in staged:
                new_ports[pname] = p
                for k in p.fes:
                    pass_claims[k] = (L.FE_SERVICE, p.id)
                    claim_names[k] = pname
                old_slots = cur.slots if cur else {}
                for k, v in p.slots.items():
                    if old_slots.get(k) != v:
                        plan.write("endpoint", k, v)
                if cur is None or cur.value != p.value:
                    plan.write("service", L.U32.pack(p.id), p.value)
                if cur is None or not cur.named:
                    plan.write("names", L.NAME_KEY.pack(L.NAME_SERVICE, p.id), encode_name(pname))
                for k, v in p.fes.items():
                    if cur is None or cur.fes.get(k) != v:
                        plan.write("frontend", k, v)
                if cur is not None:
                    plan.p1["frontend"].extend(owned((k for k in cur.fes if k not in p.fes),
                                                     (L.FE_SERVICE, p.id)))
                    plan.p3["endpoint"].extend(k for k in cur.slots if k not in p.slots)

        # --- backend removals: only once nothing references them any more
        for cur in removed_backs:
            users_after = set(self.users.get(cur.id, ()))
            for pname, p in new_ports.items():
                if p is not None and cur.id in p.bids:
                    users_after.add(pname)
                else:
                    users_after.discard(pname)
            if users_after:
                log.warning("backend %s removed but still used by %s; kept", cur.uid, sorted(users_after)[:3])
                continue
            new_backs[cur.uid] = None
            plan.p1["frontend"].extend(k for k in cur.fes if self.fe_owner.get(k) == (L.FE_BACKEND, cur.id))
            if cur.value:
                plan.p3["backend"].append(L.U32.pack(cur.id))
            if cur.name:
                plan.p3["names"].append(L.NAME_KEY.pack(L.NAME_BACKEND, cur.id))

        # A frontend key re-written in phase 2 needs no phase-1 delete (it switches atomically),
        # unless its current target disappears in phase 1 (a dropped service port, an orphan).
        rewritten = set(plan.p2["frontend"][0]) if "frontend" in plan.p2 else set()
        dropped_ids = {self.ports[n].id for n, p in new_ports.items() if p is None and n in self.ports}

        def must_delete(k: bytes) -> bool:
            if k not in rewritten:
                return True
            owner = self.fe_owner.get(k)
            return owner is None or (owner[0] == L.FE_SERVICE and owner[1] in dropped_ids)

        plan.p1["frontend"] = list(dict.fromkeys(k for k in plan.p1["frontend"] if must_delete(k)))

        # --- execute
        t1 = time.perf_counter()
        try:
            for m in ("frontend", "service", "endpoint"):
                if plan.p1.get(m):
                    self.maps[m].delete_batch(plan.p1[m])
                    res.deleted += len(plan.p1[m])
            for m in ("backend", "names", "endpoint", "service", "frontend"):
                ks, vs = plan.p2.get(m, ([], []))
                if ks:
                    self.maps[m].update_batch(ks, vs)
                    res.written += len(ks)
            for m in ("endpoint", "backend", "names"):
                if plan.p3.get(m):
                    self.maps[m].delete_batch(plan.p3[m])
                    res.deleted += len(plan.p3[m])
        except OSError:
            self.dirty = True  # the mirror no longer matches the kernel: reload next time
            raise
        finally:
            res.write_seconds = time.perf_counter() - t1

        # --- commit to the mirror
        if orphans:
            self.orphans = defaultdict(list)
            for pool, i in self._held:
                pool.release(i)
            self._held = []
        for pname, p in new_ports.items():
            cur = self.ports.get(pname)
            if cur is not None:
                self._drop_port(cur)
                if p is None:
                    self.svc_ids.release(cur.id)
            if p is not None:
                self._add_port(p)
                for k in p.fes:
                    self._claim(k, (L.FE_SERVICE, p.id))
        for uid, b in new_backs.items():
            cur = self.backs.get(uid)
            if cur is not None:
                self._drop_back(cur)
                if b is None:
                    self.be_ids.release(cur.id)
                    self.users.pop(cur.id, None)
            if b is not None:
                self._add_back(b)
                for k in b.fes:
                    self._claim(k, (L.FE_BACKEND, b.id))
        for sname, want in wanted_ports.items():
            if not want:
                self._forget_src(sname)
        for sname, sig in new_src.items():
            self._forget_src(sname)
            self._src[sname] = sig
            for sp in sig[0].ports:
                for e in sp.endpoints:
                    self._wants[e.backend_uid].add(sname)
        for uid, b in new_backs.items():
            if b is None:
                self._bsrc.pop(uid, None)
        self._bsrc.update(new_bsrc)
        res.seconds = time.perf_counter() - t0
        return res


def _bad_backend(b: Backend) -> str:
    if b.ipv4 is not None and len(b.ipv4) != 4:
        return f"ipv4 must be 4 bytes, got {len(b.ipv4)}"
    if b.ipv6 is not None and len(b.ipv6) != 16:
        return f"ipv6 must be 16 bytes, got {len(b.ipv6)}"
    return ""


def _bad_service(svc: Service) -> str:
    for vip in svc.vips:
        if len(vip) not in (4, 16):
            return f"VIP must be 4 or 16 bytes, got {len(vip)}"
    for sp in svc.ports:
        if not 0 < sp.port < 65536:
            return f"service port {sp.port} out of range 1-65535"
    return ""


def _fmt_fe(key: bytes) -> str:
    import ipaddress

    addr, port, fam, _ = L.FE_KEY.unpack(key)
    ip = ipaddress.IPv4Address(addr[:4]) if fam == L.AF_INET else ipaddress.IPv6Address(addr)
    p = int.from_bytes(port, "big")
    return f"{ip}:{p}" if fam == L.AF_INET else f"[{ip}]:{p}"
