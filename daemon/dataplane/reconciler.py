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

Memory (100,000 backends must cost a few tens of MiB, not hundreds): the mirror keeps no
per-element objects. A backend is one uid -> id dict entry plus slots in id-indexed lists (the
``Backend`` last written, shared with the caller's projection, and a reference count); its
value, name and pod-IP frontend keys are re-derived from that ``Backend`` when needed. A service
port keeps its km_service value and, per priority, the packed km_endpoint values of slots
0..n-1 as one bytes object (the keys are implied by the slot numbers). Frontend ownership is one
dict key -> ``kind << 32 | id``. Services whose input object is unchanged since it was last
written (identity, then equality) and whose backends kept their ids are skipped without any
per-endpoint work.
"""

from __future__ import annotations

import gc
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import reduce
from math import gcd
from typing import Protocol

from daemon.dataplane import layout as L
from daemon.dataplane.model import MAX_PRIORITY, Backend, LbMode, Projection, Service, Waypoint
from daemon.dataplane.types import Capacity, ReconcileResult

log = logging.getLogger(__name__)

MAX_SLOTS_PER_ENDPOINT = 16
RECONCILED_MAPS = ("frontend", "service", "endpoint", "backend", "names")
V4MAPPED = b"\0" * 10 + b"\xff\xff"
_EPV = struct.Struct("=IHH")  # km_ep_val with the port pre-swapped by htons: same bytes as L.EP_VAL
_EPV_BID = struct.Struct("=I4x")
# Frontend owner codes: a backend id (> 0) for a pod IP, minus the service-port id (< 0) for a
# VIP:port. A backend's code is the very int object stored as its id: no extra object per owner.
_NO = object()
_ZERO4 = bytes(4)
_ZERO16 = bytes(16)
_htons = socket.htons


class MapLike(Protocol):
    max_entries: int

    def update_raw(self, keys: bytes, values: bytes, n: int) -> None: ...
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


_LOCAL6 = (bytes(15) + b"\x01", bytes(16))


def _routable(ip: bytes) -> bool:
    """Loopback and unspecified addresses are never another pod: a hostNetwork workload reported
    at 127.0.0.1 must not turn every pod's own loopback traffic into "direct pod access"."""
    if len(ip) == 4:
        return ip[0] != 127 and ip != bytes(4)
    return ip not in _LOCAL6


def _be_keys(b: Backend) -> list[bytes]:
    """Pod-IP frontend keys of a backend (distinct)."""
    keys = [fe_key(ip, 0) for ip in (b.ipv4, b.ipv6) if ip and _routable(ip)]
    return keys if len(keys) < 2 or keys[0] != keys[1] else keys[:1]


_NO_WP = bytes(L.WP.size)


def render_wp(wp: Waypoint | None) -> bytes:
    """km_wp of a waypoint reference (all zero: none; family KM_WP_UNRESOLVED: refuse)."""
    if wp is None:
        return _NO_WP
    a = wp.address
    if len(a) == 16 and a[:12] == V4MAPPED:
        a = a[12:]
    port = wp.port.to_bytes(2, "big") if 0 < wp.port < 65536 else b"\0\0"
    if len(a) == 4:
        return L.WP.pack(a, port, L.AF_INET, 0)
    if len(a) == 16:
        return L.WP.pack(a, port, L.AF_INET6, 0)
    return L.WP.pack(_ZERO16, b"\0\0", L.WP_UNRESOLVED, 0)


def decode_wp(raw: bytes) -> Waypoint | None:
    addr, port, fam, _ = L.WP.unpack(raw)
    if fam == 0:
        return None
    if fam == L.WP_UNRESOLVED:
        return Waypoint(b"", 0)
    return Waypoint(addr[:4] if fam == L.AF_INET else addr, int.from_bytes(port, "big"))


def _render_backend(b: Backend) -> bytes:
    flags = (L.BE_HAS_V4 if b.ipv4 else 0) | (L.BE_HAS_V6 if b.ipv6 else 0)
    return L.BE_VAL.pack(b.ipv4 or _ZERO4, b.ipv6 or _ZERO16, flags, *_be_tail(b))


def _be_tail(b: Backend) -> tuple:
    """The waypoint part of a backend value: its own waypoint, and its hand-off as a waypoint pod
    (PROXY v2 on the application_tunnel port, else Kmesh TLV on 15019)."""
    hp = b.handoff_port
    w = b.waypoint
    if w is None and not hp:
        return _BE_TAIL_PLAIN  # nearly every backend: no per-backend work
    wp = render_wp(w)
    if 0 < hp < 65536:
        return wp[:16], wp[16:18], wp[18], 0, hp.to_bytes(2, "big"), L.HO_PROXY, 0
    return wp[:16], wp[16:18], wp[18], 0, _TLV_PORT, L.HO_TLV, 0


_TLV_PORT = L.HANDOFF_TLV_PORT.to_bytes(2, "big")
_BE_TAIL_PLAIN = (_ZERO16, b"\0\0", 0, 0, _TLV_PORT, L.HO_TLV, 0)


def _bids(vals: tuple[bytes, ...]) -> set[int]:
    """Backend ids referenced by a port's packed slot values."""
    out: set[int] = set()
    for blob in vals:
        if blob:
            out.update(t[0] for t in _EPV_BID.iter_unpack(blob))
    return out


class _IdPool:
    """Small integer ids >= 1, reusing freed ones (a byte per id, not a set of int objects)."""

    _LIMIT = 1 << 25  # ids above this (only from foreign maps) live in a set

    def __init__(self) -> None:
        self.used = bytearray(1024)
        self.big: set[int] = set()
        self.free: list[int] = []
        self.next = 1

    def is_used(self, i: int) -> bool:
        if i >= self._LIMIT:
            return i in self.big
        return i < len(self.used) and bool(self.used[i])

    def take(self) -> int:
        while self.free:
            i = self.free.pop()
            if not self.is_used(i):
                self.mark(i)
                return i
        used, i = self.used, self.next
        while i < len(used) and used[i]:
            i += 1
        if i >= self._LIMIT:
            while i in self.big:
                i += 1
            self.big.add(i)
        else:
            if i >= len(used):
                used.extend(bytes(max(i + 1 - len(used), len(used))))
            used[i] = 1
        self.next = i + 1
        return i

    def mark(self, i: int) -> None:
        if i >= self._LIMIT:
            self.big.add(i)
            return
        if i >= len(self.used):
            self.used.extend(bytes(max(i + 1 - len(self.used), len(self.used))))
        self.used[i] = 1

    def release(self, i: int) -> None:
        if self.is_used(i):
            if i >= self._LIMIT:
                self.big.discard(i)
            else:
                self.used[i] = 0
            self.free.append(i)


class _Port:
    """Applied (or planned) state of one service port."""

    __slots__ = ("id", "name", "service", "value", "vals", "fes")

    def __init__(self, sid: int, name: str, service: str, value: bytes, vals: tuple[bytes, ...],
                 fes: tuple[bytes, ...]) -> None:
        self.id = sid
        self.name = name  # "ns/host:port"
        self.service = service
        self.value = value  # km_service value; b"" = not in the map
        self.vals = vals  # per priority: packed km_ep_val of slots 0..n-1
        self.fes = fes  # frontend keys it owns, sorted

    def nslots(self) -> int:
        return sum(len(v) for v in self.vals) // 8


class _Writes:
    """Phase-2 writes of one map: packed keys and values appended to two growing buffers, so a
    430k-element pass leaves no per-element objects behind (they would fragment the heap)."""

    __slots__ = ("keys", "vals", "n")

    def __init__(self) -> None:
        self.keys = bytearray()
        self.vals = bytearray()
        self.n = 0

    def add(self, key: bytes, value: bytes, n: int = 1) -> None:
        self.keys += key
        self.vals += value
        self.n += n


_EMPTY_VALS = (b"",) * L.PRIOS
_SVC_VAL_PACK = L.SVC_VAL.pack
_SVC_HEAD = L.SVC_VAL.size - L.WP.size  # km_service bytes before its km_wp


def _port_name(service: str, port: int) -> str:
    return f"{service}:{port}"


class _Worker(threading.Thread):
    """Runs fn on its own thread (map syscalls release the GIL); the caller joins and re-raises."""

    def __init__(self, fn: Callable[[], None]) -> None:
        super().__init__(name="reconcile-write", daemon=True)
        self.fn = fn
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the reconcile pass
            self.error = exc
        finally:
            self.fn = None  # type: ignore[assignment]


class _EarlyWrite(threading.Thread):
    """Phase-2 backend (and backend name) writes of a big pass, run while the services render."""

    def __init__(self, maps: Mapping[str, MapLike], batches: list[tuple[str, _Writes]]) -> None:
        super().__init__(name="reconcile-early-write", daemon=True)
        self.maps = maps
        self.batches = batches
        self.written = 0
        self.seconds = 0.0
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        t = time.perf_counter()
        try:
            for name, wr in self.batches:
                if wr.n:
                    self.maps[name].update_raw(wr.keys, wr.vals, wr.n)
                    self.written += wr.n
        except BaseException as exc:  # noqa: BLE001 - re-raised by the reconcile pass
            self.error = exc
        finally:
            self.batches = []
            self.seconds = time.perf_counter() - t


class Reconciler:
    """Owns the contents of km_frontend, km_service, km_endpoint, km_backend and km_names."""

    EARLY_WRITE_MIN = 4096  # backends + names in one pass from which they are written concurrently
    TRIM_MIN = 20000  # elements written + deleted in one pass from which freed heap is returned

    def __init__(self, maps: Mapping[str, MapLike], capacity: Capacity) -> None:
        self.maps = maps
        self.cap = capacity
        self.limits = {m: maps[m].max_entries for m in RECONCILED_MAPS}
        self._reset()

    # ----------------------------------------------------------------- state
    def _reset(self) -> None:
        self.ports: dict[str, _Port] = {}
        self.svc_ports: dict[str, tuple[str, ...]] = {}
        self.port_by_id: dict[int, _Port] = {}
        self.be_id: dict[str, int] = {}  # backend uid -> id, for backends in the maps
        self.be_uid: list[str | None] = [None]  # id -> uid
        self.be_src: list[Backend | None] = [None]  # id -> the Backend last written (None: loaded)
        self.be_refs: list[int] = [0]  # id -> number of service ports whose slots use it
        self._be_loaded: dict[int, Backend] = {}  # id -> Backend decoded by load(), until verified
        self.fe_owner: dict[bytes, int] = {}  # frontend key -> backend id / -(service-port id)
        self.orphans: dict[str, list[bytes]] = {m: [] for m in RECONCILED_MAPS}
        self.svc_ids = _IdPool()
        self.be_ids = _IdPool()
        self.dirty = False
        self._n_svc = 0  # ports with a km_service entry
        self._n_ep = 0  # endpoint slots
        # last rendered input per service and the backend ids it saw (None: that input was rejected,
        # so it is retried): an unchanged input is skipped
        self._src: dict[str, tuple[Service, tuple[int | None, ...] | None]] = {}
        # backend uid -> service(s) whose last rendered input names it: str, or a set when several
        self._wants: dict[str, str | set[str]] = {}
        self._synced = False  # update() before the first sync() after load() does a full sync
        self._held: list[tuple[_IdPool, int]] = []  # orphan ids reserved until their cleanup
        # backends gone from the projection but kept in the maps (a rejected service still uses
        # them): services were rendered without them, so their return must re-render those
        self._kept: set[str] = set()
        self._early: _EarlyWrite | None = None
        self._verified = 0  # loaded backends adopted by the last pass (their decoded copies freed)

    def counts(self) -> dict[str, int]:
        """Entries per reconciled map, as the mirror knows them."""
        o = self.orphans
        nb = len(self.be_id)
        return {"frontend": len(self.fe_owner) + len(o["frontend"]),
                "service": self._n_svc + len(o["service"]),
                "endpoint": self._n_ep + len(o["endpoint"]),
                "backend": nb + len(o["backend"]),
                "names": len(self.ports) + nb + len(o["names"])}

    def service_name(self, sid: int) -> str | None:
        p = self.port_by_id.get(sid)
        return p.service if p is not None else None

    def backend_uid(self, bid: int) -> str | None:
        return self.be_uid[bid] if 0 < bid < len(self.be_uid) else None

    def _backend_of(self, bid: int) -> Backend | None:
        b = self.be_src[bid]
        return b if b is not None else self._be_loaded.get(bid)

    def _set_backend(self, bid: int, uid: str, b: Backend | None) -> None:
        n = len(self.be_uid)
        if bid >= n:
            grow = bid + 1 - n
            self.be_uid.extend([None] * grow)
            self.be_src.extend([None] * grow)
            self.be_refs.extend([0] * grow)
        self.be_id[uid] = bid
        self.be_uid[bid] = uid
        self.be_src[bid] = b
        self.be_ids.mark(bid)

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
        used_names: set[tuple[int, int]] = set()
        orphans = self.orphans

        # service ports: header + slots 0..n-1 per priority; other slots are orphans
        services = {L.U32.unpack(k)[0]: v for k, v in self.maps["service"].dump()}
        slots: dict[int, dict[tuple[int, int], bytes]] = {}
        for k, v in self.maps["endpoint"].dump():
            sid, prio, slot = L.EP_KEY.unpack(k)
            slots.setdefault(sid, {})[(prio, slot)] = v
        for sid in set(services) | set(slots):
            nm = names.get((L.NAME_SERVICE, sid))
            pname = decode_name(nm)[0] if nm else ""
            sname, _, port = pname.rpartition(":")
            mine = slots.pop(sid, {})
            if not sname or not port.isdigit() or pname in self.ports or sid >= _IdPool._LIMIT:
                if sid in services:
                    orphans["service"].append(L.U32.pack(sid))
                orphans["endpoint"].extend(L.EP_KEY.pack(sid, p, s) for p, s in mine)
                self._hold(self.svc_ids, sid)
                continue
            used_names.add((L.NAME_SERVICE, sid))
            vals = []
            for prio in range(L.PRIOS):
                run = []
                while (prio, len(run)) in mine:
                    run.append(mine.pop((prio, len(run))))
                vals.append(b"".join(run))
            orphans["endpoint"].extend(L.EP_KEY.pack(sid, p, s) for p, s in mine)
            self._add_port(_Port(sid, pname, sname, services.get(sid, b""), tuple(vals), ()))
            self.svc_ids.mark(sid)
        del services, slots

        # backends: decoded back into a Backend, verified against the projection on first sync
        limit = 2 * max(self.limits["backend"], 1) + 1024
        for k, val in self.maps["backend"].dump():
            bid = L.U32.unpack(k)[0]
            nm = names.get((L.NAME_BACKEND, bid))
            parts = decode_name(nm) if nm else [""]
            uid = parts[0]
            if not uid or uid in self.be_id or bid >= limit:
                orphans["backend"].append(k)
                self._hold(self.be_ids, bid)
                continue
            used_names.add((L.NAME_BACKEND, bid))
            ip4, ip6, flags, wpa, wpp, wpf, _, hport, hmode, _ = L.BE_VAL.unpack(val)
            b = Backend(uid, parts[1] if len(parts) > 1 else "", parts[2] if len(parts) > 2 else "",
                        ip4 if flags & L.BE_HAS_V4 else None, ip6 if flags & L.BE_HAS_V6 else None,
                        int.from_bytes(hport, "big") if hmode == L.HO_PROXY else 0,
                        decode_wp(L.WP.pack(wpa, wpp, wpf, 0)))
            self._set_backend(bid, uid, None)
            self._be_loaded[bid] = b
        for key in names:
            if key not in used_names:
                orphans["names"].append(L.NAME_KEY.pack(*key))
                self._hold(self.svc_ids if key[0] == L.NAME_SERVICE else self.be_ids, key[1])
        del names

        fes: dict[int, list[bytes]] = {}
        for k, v in self.maps["frontend"].dump():
            kind, oid = L.FE_VAL.unpack(v)
            if kind == L.FE_SERVICE and oid in self.port_by_id:
                fes.setdefault(oid, []).append(k)
                self.fe_owner[k] = -oid
                continue
            if kind == L.FE_BACKEND and 0 < oid < len(self.be_uid) and self.be_uid[oid] is not None:
                b = self._be_loaded.get(oid)
                if b is not None and k in _be_keys(b):
                    self.fe_owner[k] = oid
                    continue
            orphans["frontend"].append(k)
            if kind == L.FE_SERVICE:
                self._hold(self.svc_ids, oid)
        for sid, keys in fes.items():
            self.port_by_id[sid].fes = tuple(sorted(keys))
        refs = self.be_refs
        for p in self.ports.values():
            for x in _bids(p.vals):
                if x < len(refs) and self.be_uid[x] is not None:
                    refs[x] += 1

    def _add_port(self, p: _Port) -> None:
        self.ports[p.name] = p
        self.svc_ports[p.service] = (*self.svc_ports.get(p.service, ()), p.name)
        self.port_by_id[p.id] = p
        self._n_svc += 1 if p.value else 0
        self._n_ep += p.nslots()

    def _drop_port(self, p: _Port) -> None:
        self.ports.pop(p.name, None)
        names = tuple(n for n in self.svc_ports.get(p.service, ()) if n != p.name)
        if names:
            self.svc_ports[p.service] = names
        else:
            self.svc_ports.pop(p.service, None)
        self.port_by_id.pop(p.id, None)
        code = -p.id
        for k in p.fes:
            if self.fe_owner.get(k) == code:
                del self.fe_owner[k]
        self._n_svc -= 1 if p.value else 0
        self._n_ep -= p.nslots()

    def _hold(self, pool: _IdPool, i: int) -> None:
        """Keep an orphan's id out of circulation until sync() has deleted the orphan: reusing it
        earlier would let the phase-3 orphan delete hit the new owner's entry."""
        if not pool.is_used(i):
            pool.mark(i)
            self._held.append((pool, i))

    def _claim(self, key: bytes, code: int) -> None:
        """Record a frontend key's new owner; a previous owner port's mirror forgets it."""
        prev = self.fe_owner.get(key)
        if prev is not None and prev != code and prev < 0:
            o = self.port_by_id.get(-prev)
            if o is not None:
                o.fes = tuple(k for k in o.fes if k != key)
        self.fe_owner[key] = code

    def _want(self, uid: str, sname: str) -> None:
        cur = self._wants.get(uid)
        if cur is None:
            self._wants[uid] = sname
        elif isinstance(cur, str):
            if cur != sname:
                self._wants[uid] = {cur, sname}
        else:
            cur.add(sname)

    def _unwant(self, uid: str, sname: str) -> None:
        cur = self._wants.get(uid)
        if cur is None:
            return
        if isinstance(cur, str):
            if cur == sname:
                del self._wants[uid]
            return
        cur.discard(sname)
        if len(cur) == 1:
            self._wants[uid] = next(iter(cur))
        elif not cur:
            del self._wants[uid]

    def _forget_src(self, sname: str) -> None:
        old = self._src.pop(sname, None)
        if old is None:
            return
        for sp in old[0].ports:
            for e in sp.endpoints:
                self._unwant(e.backend_uid, sname)

    # ------------------------------------------------------------ rendering
    @staticmethod
    def _render_slots(lb: LbMode, endpoints: list[tuple[str, int, int, int, int]]
                      ) -> tuple[bytes, tuple[bytes, ...]]:
        """endpoints: (uid, target_port, weight, priority, backend id) -> header, per-prio slot values."""
        if lb == LbMode.RANDOM:
            groups = {0: endpoints} if endpoints else {}
        else:
            groups = {}
            for e in endpoints:
                prio = e[3]
                if lb == LbMode.STRICT and prio != 0:
                    continue
                groups.setdefault(min(max(prio, 0), MAX_PRIORITY), []).append(e)
        pack = _EPV.pack
        if lb == LbMode.RANDOM and all(e[2] == 1 for e in endpoints):  # the common case
            endpoints.sort()
            blob = b"".join([pack(e[4], _htons(e[1]), 0) for e in endpoints])
            n = len(endpoints)
            return _SVC_VAL_PACK(0, n, 0, 0, 0, 0, 0, 0, 0, _ZERO16, b"\0\0", 0, 0), (blob, *_EMPTY_VALS[1:])
        counts = [0] * L.PRIOS
        vals = [b""] * L.PRIOS
        for prio, eps in groups.items():
            eps.sort()  # (uid, port, weight, prio, id): the same uid has the same id, prio only ties equals
            if all(e[2] == 1 for e in eps):
                blob = b"".join([pack(e[4], _htons(e[1]), 0) for e in eps])
            else:
                blob = b"".join([pack(e[4], _htons(e[1]), 0) * reps
                                 for e, reps in zip(eps, slot_counts([e[2] for e in eps]), strict=True)])
            vals[prio] = blob
            counts[prio] = len(blob) // 8
        return L.SVC_VAL.pack(int(lb), *counts, 0, _ZERO16, b"\0\0", 0, 0), tuple(vals)

    # ------------------------------------------------------------ reconcile
    def sync(self, projection: Projection) -> ReconcileResult:
        if self.dirty:
            self.load()
        removed = [u for u in self.be_id if u not in projection.backends]
        res = self._reconcile(projection, set(projection.services) | set(self.svc_ports),
                              [*projection.backends, *removed], orphans=True)
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
            w = self._wants.get(uid)
            if isinstance(w, str):
                svc_scope.add(w)
            elif w:
                svc_scope.update(w)
        return self._reconcile(projection, svc_scope, sorted(be_scope), orphans=False)

    def _reconcile(self, proj: Projection, svc_scope: set[str], be_order: list[str], orphans: bool
                   ) -> ReconcileResult:
        # hundreds of thousands of small objects: keep the cyclic GC from rescanning them mid-pass
        enabled = gc.isenabled()
        gc.disable()
        try:
            res = self._reconcile_inner(proj, svc_scope, be_order, orphans)
            if res.written + res.deleted + self._verified >= self.TRIM_MIN:
                t = time.perf_counter()
                _malloc_trim()  # the pass's buffers are free now: hand them back to the OS
                res.seconds += time.perf_counter() - t
            return res
        except BaseException:
            early, self._early = self._early, None
            if early is not None:  # failed while the early writes ran: the mirror is unknown
                early.join()
                self.dirty = True
            raise
        finally:
            if enabled:
                gc.enable()

    def _reconcile_inner(self, proj: Projection, svc_scope: set[str], be_order: list[str], orphans: bool
                         ) -> ReconcileResult:
        t0 = time.perf_counter()
        res = ReconcileResult()
        p1: dict[str, list[bytes]] = {"frontend": [], "service": [], "endpoint": []}
        p3: dict[str, list[bytes]] = {"endpoint": [], "backend": [], "names": []}
        w = {m: _Writes() for m in ("backend", "names", "endpoint", "service", "frontend")}
        usage = self.counts()
        limits = self.limits
        new_ports: dict[str, _Port | None] = {}  # port name -> planned state (None = removed)
        new_backs: dict[str, int | None] = {}  # uid -> id written in this pass / None = removed
        verified: list[tuple[int, Backend]] = []  # loaded backends found exact: adopt their source
        fe_owner = self.fe_owner
        be_id = self.be_id

        if orphans:
            for name in ("frontend", "service", "endpoint"):
                p1[name].extend(self.orphans[name])
                usage[name] -= len(self.orphans[name])
            p3["backend"].extend(self.orphans["backend"])
            p3["names"].extend(self.orphans["names"])

        # --- what each in-scope service wants, and which frontend keys get released
        src = self._src
        wanted: dict[str, tuple[Service | None, dict[str, int], bool]] = {}
        released: set[bytes] = set()
        for sname in sorted(svc_scope):
            svc = proj.services.get(sname)
            old = src.get(sname)
            same_input = svc is not None and old is not None and old[1] is not None and (
                old[0] is svc or old[0] == svc)
            want: dict[str, int] = {}
            if svc is not None and svc.vips:
                for i, sp in enumerate(svc.ports):
                    want.setdefault(_port_name(sname, sp.port), i)
            wanted[sname] = (svc, want, same_input)
            if same_input:
                continue  # the same ports and VIPs as written: nothing released
            for pname in self.svc_ports.get(sname, ()):
                cur = self.ports[pname]
                if pname not in want:
                    released.update(cur.fes)
                elif svc is not None:
                    port = svc.ports[want[pname]].port
                    keep = {fe_key(v, port) for v in svc.vips if len(v) in (4, 16)}
                    released.update(k for k in cur.fes if k not in keep)
        pb = proj.backends
        for uid in be_order:
            bid = be_id.get(uid)
            if bid is None:
                continue
            b = pb.get(uid)
            cur_b = self._backend_of(bid)
            if b is cur_b or cur_b is None:
                continue
            keep = set(_be_keys(b)) if b is not None and not _bad_backend(b) else set()
            code = bid
            released.update(k for k in _be_keys(cur_b) if k not in keep and fe_owner.get(k) == code)

        pass_claims: dict[bytes, int] = {}  # keys accepted for an owner in this pass
        claim_names: dict[bytes, str] = {}

        def owner_name(key: bytes) -> str:
            code = fe_owner.get(key, 0)
            oid = abs(code)
            if code < 0 and oid in self.port_by_id:
                return self.port_by_id[oid].name
            uid = self.backend_uid(oid) if code > 0 else None
            return uid or f"#{oid}"

        def claimable(key: bytes, code: int) -> bool:
            if pass_claims.get(key, code) != code:
                return False
            owner = fe_owner.get(key)
            return owner is None or owner == code or key in released

        def drop_port(cur: _Port, count_usage: bool = True) -> None:
            new_ports[cur.name] = None
            code = -cur.id
            p1["frontend"].extend(k for k in cur.fes if fe_owner.get(k) == code)
            if cur.value:
                p1["service"].append(L.U32.pack(cur.id))
            for prio, blob in enumerate(cur.vals):
                p1["endpoint"].extend(L.EP_KEY.pack(cur.id, prio, s) for s in range(len(blob) // 8))
            if count_usage:
                usage["frontend"] -= len(cur.fes)
                usage["service"] -= 1 if cur.value else 0
                usage["endpoint"] -= cur.nslots()
            p3["names"].append(L.NAME_KEY.pack(L.NAME_SERVICE, cur.id))

        # --- services removed whole (phase 1; frees capacity for what follows)
        for sname, (_svc, want, _same) in wanted.items():
            if not want:
                for pname in sorted(self.svc_ports.get(sname, ())):
                    drop_port(self.ports[pname])

        # --- backends (adds and changes; removals are decided after the services)
        removed_backs: list[tuple[str, int]] = []
        kept_back: list[str] = []  # uids leaving self._kept in this pass
        override: dict[str, int | None] = {}  # backends whose id changes in this pass
        be_src = self.be_src
        bw, nw, fw = w["backend"], w["names"], w["frontend"]
        u_be, u_nm, u_fe = usage["backend"], usage["names"], usage["frontend"]
        lim_be, lim_nm, lim_fe = limits["backend"], limits["names"], limits["frontend"]
        fek, bepack, namepack = L.FE_KEY.pack, L.BE_VAL.pack, L.NAME_VAL.pack
        fevpack, u32, namekey = L.FE_VAL.pack, L.U32.pack, L.NAME_KEY.pack
        kept, loaded = self._kept, self._be_loaded
        take = self.be_ids.take
        bk, bv, nk, nv = bw.keys.extend, bw.vals.extend, nw.keys.extend, nw.vals.extend
        fk, fv = fw.keys.extend, fw.vals.extend
        for uid in be_order:
            b = pb.get(uid)
            bid = be_id.get(uid)
            if b is None:
                if bid is not None:
                    removed_backs.append((uid, bid))
                    override[uid] = None
                continue
            cur_b = None
            if bid is not None:
                if uid in kept:
                    override[uid] = bid  # services that named it saw None: make them re-render
                    kept_back.append(uid)
                cur_b = be_src[bid]
                if cur_b is b or (cur_b is not None and cur_b == b):
                    continue  # unchanged since we last wrote it
                if cur_b is None:
                    cur_b = loaded.get(bid)
            ip4, ip6 = b.ipv4, b.ipv6
            if (ip4 is not None and len(ip4) != 4) or (ip6 is not None and len(ip6) != 16):
                res.rejected[f"backend/{uid}"] = _bad_backend(b)
                continue
            nbid = take() if bid is None else bid
            code = nbid
            flags = (L.BE_HAS_V4 if ip4 else 0) | (L.BE_HAS_V6 if ip6 else 0)
            value = bepack(ip4 or _ZERO4, ip6 or _ZERO16, flags, *_be_tail(b))
            name = namepack(f"{uid}\0{b.name}\0{b.namespace}".encode()[:L.NAME_LEN - 1])
            keys = _be_keys(b) if ip6 else [fek(ip4, b"\0\0", L.AF_INET, 0)] if ip4 else []
            fes = []
            for k in keys:
                pc = pass_claims.get(k)
                if pc is not None and pc != code:
                    continue
                o = fe_owner.get(k)
                if o is None or o == code or k in released:
                    fes.append(k)
            if cur_b is not None:
                cur_value = _render_backend(cur_b)
                cur_name = encode_name(cur_b.uid, cur_b.name, cur_b.namespace)
                cur_fes = [k for k in _be_keys(cur_b) if fe_owner.get(k) == code]
                if cur_value == value and cur_name == name and cur_fes == fes:
                    verified.append((nbid, b))  # already in the maps exactly so (first sync after a restart)
                    for k in fes:
                        pass_claims[k] = code
                    continue
                need_fe = sum(1 for k in fes if k not in cur_fes)
            else:
                cur_value = cur_name = b""
                cur_fes = []
                need_fe = len(fes)
            new = int(bid is None)
            full = "backend" if u_be + new > lim_be else "names" if u_nm + new > lim_nm else \
                "frontend" if u_fe + need_fe > lim_fe else ""
            if full:
                res.rejected[f"backend/{uid}"] = f"{full} map full ({limits[full]} entries)"
                if new:
                    self.be_ids.release(nbid)
                continue
            u_be += new
            u_nm += new
            u_fe += need_fe
            if new:
                override[uid] = nbid
            new_backs[uid] = nbid
            for k in fes:
                pass_claims[k] = code
            if cur_value != value:
                bk(u32(nbid))
                bv(value)
            if cur_name != name:
                nk(namekey(L.NAME_BACKEND, nbid))
                nv(name)
            for k in fes:
                if k not in cur_fes:
                    fk(k)
                    fv(fevpack(L.FE_BACKEND, nbid))
            if cur_fes:
                p1["frontend"].extend(k for k in cur_fes if k not in fes)
        usage["backend"], usage["names"], usage["frontend"] = u_be, u_nm, u_fe
        bw.n = len(bw.keys) // 4
        nw.n = len(nw.keys) // L.NAME_KEY.size
        fw.n = len(fw.keys) // L.FE_KEY.size
        if bw.n + nw.n >= self.EARLY_WRITE_MIN:
            # A big batch (a first sync): let the kernel insert the backends and their names on a
            # second core while the services are rendered. Only ids nothing references yet or
            # in-place value changes, so writing them before phase 1 is as safe as in phase 2.
            self._early = _EarlyWrite(self.maps, [("backend", bw), ("names", nw)])
            w["backend"], w["names"] = _Writes(), _Writes()
            nw = w["names"]

        # --- services: kept and new ports
        new_src: dict[str, tuple[Service, tuple[int | None, ...] | None]] = {}
        ovget = override.get
        bidget = be_id.get
        ew, sw = w["endpoint"], w["service"]
        ek, ev, epkey = ew.keys.extend, ew.vals.extend, L.EP_KEY.pack
        render = self._render_slots
        for sname, (svc, want, same_input) in wanted.items():
            if not want or svc is None:
                continue
            if same_input and not override:
                continue  # same input, no backend changed id in this pass: nothing to write
            uids = [e.backend_uid for sp in svc.ports for e in sp.endpoints]
            if same_input and not any(u in override for u in uids):
                continue
            live = [bidget(u) if (r := ovget(u, _NO)) is _NO else r for u in uids]
            sig = tuple(live)
            old = src.get(sname)
            if old is not None and old[1] == sig and (old[0] is svc or old[0] == svc):
                continue
            bad = _bad_service(svc)
            if bad:
                res.rejected[sname] = bad
                new_src[sname] = (svc, None)  # retried on every pass until it fits
                continue
            staged: list[tuple[str, _Port, _Port | None]] = []
            need = {"frontend": 0, "service": 0, "endpoint": 0, "names": 0}
            reason = ""
            dropped = [self.ports[n] for n in sorted(self.svc_ports.get(sname, ())) if n not in want]
            for cur in dropped:
                need["frontend"] -= len(cur.fes)
                need["service"] -= 1 if cur.value else 0
                need["endpoint"] -= cur.nslots()
            offsets = []
            off = 0
            for sp in svc.ports:
                offsets.append(off)
                off += len(sp.endpoints)
            for pname, i in sorted(want.items()):
                sp = svc.ports[i]
                cur = self.ports.get(pname)
                if cur is None:
                    sid = self.svc_ids.take()
                else:
                    sid = cur.id
                base = offsets[i]
                eps = [(e.backend_uid, e.target_port, e.weight, e.priority, bid)
                       for e, bid in zip(sp.endpoints, live[base:base + len(sp.endpoints)], strict=True)
                       if bid is not None and 0 < e.target_port < 65536]
                value, vals = render(svc.lb_mode, eps)
                if svc.waypoint is not None:
                    value = value[:_SVC_HEAD] + render_wp(svc.waypoint)
                code = -sid
                fes = tuple(sorted({fe_key(vip, sp.port) for vip in svc.vips}))
                for k in fes:
                    if not claimable(k, code):
                        other = claim_names.get(k) or owner_name(k)
                        reason = f"frontend {_fmt_fe(k)} already belongs to {other}"
                        break
                if reason:
                    break
                old_vals = cur.vals if cur is not None else _EMPTY_VALS
                need["service"] += 0 if cur is not None and cur.value else 1
                need["names"] += 0 if cur is not None else 1
                need["endpoint"] += (sum(map(len, vals)) if cur is None else sum(
                    max(0, len(n) - len(o)) for n, o in zip(vals, old_vals, strict=True))) // 8
                need["frontend"] += sum(1 for k in fes if cur is None or k not in cur.fes)
                staged.append((pname, _Port(sid, pname, sname, value, vals, fes), cur))
            if not reason:
                full = [m for m, n in need.items() if usage[m] + n > limits[m]]
                if full:
                    m = full[0]
                    reason = f"{m} map full: needs {need[m]} more, {limits[m] - usage[m]} of {limits[m]} free"
            if reason:
                res.rejected[sname] = reason
                new_src[sname] = (svc, None)
                for _pname, p, cur in staged:
                    if cur is None:
                        self.svc_ids.release(p.id)
                continue
            new_src[sname] = (svc, sig)
            same = not dropped and all(cur is not None and cur.value == p.value and cur.vals == p.vals
                                       and cur.fes == p.fes for _pname, p, cur in staged)
            if same:
                for pname, p, _cur in staged:  # already in the maps exactly so
                    for k in p.fes:
                        pass_claims[k] = -p.id
                        claim_names[k] = pname
                continue
            for cur in dropped:
                drop_port(cur, count_usage=False)  # already in `need`
            for m, n in need.items():
                usage[m] += n
            for pname, p, cur in staged:
                new_ports[pname] = p
                sid = p.id
                for k in p.fes:
                    pass_claims[k] = -sid
                    claim_names[k] = pname
                old_vals = cur.vals if cur is not None else _EMPTY_VALS
                for prio, (nv, ov) in enumerate(zip(p.vals, old_vals, strict=True)):
                    if nv == ov:
                        continue
                    n_new, n_old = len(nv) // 8, len(ov) // 8
                    if not ov:
                        for s in range(n_new):
                            ek(epkey(sid, prio, s))
                        ev(nv)
                        ew.n += n_new
                    else:
                        for s in range(n_new):
                            v = nv[s * 8:s * 8 + 8]
                            if s >= n_old or ov[s * 8:s * 8 + 8] != v:
                                ew.add(L.EP_KEY.pack(sid, prio, s), v)
                        p3["endpoint"].extend(L.EP_KEY.pack(sid, prio, s) for s in range(n_new, n_old))
                if cur is None or cur.value != p.value:
                    sw.add(L.U32.pack(sid), p.value)
                if cur is None:
                    nw.add(L.NAME_KEY.pack(L.NAME_SERVICE, sid), encode_name(pname))
                fval = L.FE_VAL.pack(L.FE_SERVICE, sid)
                for k in p.fes:
                    if cur is None or k not in cur.fes:
                        fw.add(k, fval)
                if cur is not None:
                    code = -sid
                    p1["frontend"].extend(k for k in cur.fes if k not in p.fes and fe_owner.get(k) == code)

        # --- backend reference counts after this pass
        delta: dict[int, int] = {}
        for pname, p in new_ports.items():
            cur = self.ports.get(pname)
            if cur is not None:
                for x in _bids(cur.vals):
                    delta[x] = delta.get(x, 0) - 1
            if p is not None:
                for x in _bids(p.vals):
                    delta[x] = delta.get(x, 0) + 1

        # --- backend removals: only once nothing references them any more
        kept_now: list[str] = []
        for uid, bid in removed_backs:
            after = (self.be_refs[bid] if bid < len(self.be_refs) else 0) + delta.get(bid, 0)
            if after > 0:
                log.warning("backend %s removed but still used by %d service port(s); kept", uid, after)
                kept_now.append(uid)
                continue
            new_backs[uid] = None
            cur_b = self._backend_of(bid)
            code = bid
            if cur_b is not None:
                p1["frontend"].extend(k for k in _be_keys(cur_b) if fe_owner.get(k) == code)
            p3["backend"].append(L.U32.pack(bid))
            p3["names"].append(L.NAME_KEY.pack(L.NAME_BACKEND, bid))

        # A frontend key re-written in phase 2 needs no phase-1 delete (it switches atomically),
        # unless its current target disappears in phase 1 (a dropped service port, an orphan).
        if p1["frontend"]:
            ks = L.FE_KEY.size
            rewritten = {bytes(fw.keys[i:i + ks]) for i in range(0, len(fw.keys), ks)}
            dropped_ids = {self.ports[n].id for n, p in new_ports.items() if p is None and n in self.ports}

            def must_delete(k: bytes) -> bool:
                if k not in rewritten:
                    return True
                owner = fe_owner.get(k)
                return owner is None or (owner < 0 and -owner in dropped_ids)

            p1["frontend"] = list(dict.fromkeys(k for k in p1["frontend"] if must_delete(k)))

        # --- execute
        early, self._early = self._early, None

        def execute() -> None:
            t1 = time.perf_counter()
            try:
                if early is not None:  # backends and their names first, as phase 2 would
                    early.join()
                    res.written += early.written
                    res.write_seconds += early.seconds
                    if early.error is not None:
                        raise early.error
                for m in ("frontend", "service", "endpoint"):
                    if p1[m]:
                        self.maps[m].delete_batch(p1[m])
                        res.deleted += len(p1[m])
                for m in ("backend", "names", "endpoint", "service", "frontend"):
                    wr = w[m]
                    if wr.n:
                        self.maps[m].update_raw(wr.keys, wr.vals, wr.n)
                        res.written += wr.n
                for m in ("endpoint", "backend", "names"):
                    if p3[m]:
                        self.maps[m].delete_batch(p3[m])
                        res.deleted += len(p3[m])
            finally:
                res.write_seconds += time.perf_counter() - t1

        # A big pass writes on a second core while the mirror is committed here: if a write fails
        # the mirror is marked dirty and rebuilt from the maps by the next call, so committing
        # ahead of the kernel is never observable.
        writer = None
        if early is not None or sum(x.n for x in w.values()) >= self.EARLY_WRITE_MIN:
            writer = _Worker(execute)
        else:
            try:
                execute()
            except BaseException:
                self.dirty = True  # the mirror no longer matches the kernel: reload next time
                raise
        try:
            self._commit(proj, new_ports, new_backs, verified, delta, kept_back, kept_now,
                         pass_claims, wanted, new_src, orphans)
        except BaseException:
            self.dirty = True
            raise
        finally:
            if writer is not None:
                writer.join()
                if writer.error is not None:
                    self.dirty = True
                    raise writer.error
        res.seconds = time.perf_counter() - t0
        return res

    def _commit(self, proj: Projection, new_ports: dict[str, _Port | None],
                new_backs: dict[str, int | None], verified: list[tuple[int, Backend]], delta: dict[int, int],
                kept_back: list[str], kept_now: list[str], pass_claims: dict[bytes, int],
                wanted: dict[str, tuple[Service | None, dict[str, int], bool]],
                new_src: dict[str, tuple[Service, tuple[int | None, ...] | None]], orphans: bool) -> None:
        """Apply a pass's plan to the mirror (the maps are written, or being written)."""
        fe_owner, be_id, be_src, src, pb = self.fe_owner, self.be_id, self.be_src, self._src, proj.backends
        # --- commit to the mirror
        if orphans:
            self.orphans = {m: [] for m in RECONCILED_MAPS}
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
        self._kept.difference_update(kept_back)
        self._kept.update(kept_now)
        self._verified = len(verified)
        for bid, b in verified:
            be_src[bid] = b
            self._be_loaded.pop(bid, None)
        top = max((nb for nb in new_backs.values() if nb is not None), default=0)
        if top >= len(self.be_uid):
            grow = top + 1 - len(self.be_uid)
            self.be_uid.extend([None] * grow)
            be_src.extend([None] * grow)
            self.be_refs.extend([0] * grow)
        be_uid = self.be_uid
        for uid, nb in new_backs.items():
            bid = be_id.get(uid)
            if bid is not None:  # changed or removed: forget its current pod-IP frontends
                cur_b = self._backend_of(bid)
                code = bid
                if cur_b is not None:
                    for k in _be_keys(cur_b):
                        if fe_owner.get(k) == code:
                            del fe_owner[k]
                self._be_loaded.pop(bid, None)
            if nb is None:
                self._kept.discard(uid)
                if bid is not None:
                    del be_id[uid]
                    be_uid[bid] = None
                    be_src[bid] = None  # its reference count is 0 once `delta` is applied below
                    self.be_ids.release(bid)
                continue
            nbid = nb
            b = pb[uid]
            be_id[uid] = nbid
            be_uid[nbid] = uid
            be_src[nbid] = b
        # every frontend key accepted in this pass (the key objects made while planning are kept)
        for k, code in pass_claims.items():
            owner = fe_owner.get(k)
            if owner is None:
                fe_owner[k] = code
            elif owner != code:
                self._claim(k, code)
        refs = self.be_refs
        for bid, dv in delta.items():
            if bid < len(refs):
                refs[bid] += dv
        for sname, (_svc, want, _same) in wanted.items():
            if not want:
                self._forget_src(sname)
        wants = self._wants
        for sname, sig in new_src.items():
            if sname in src:
                self._forget_src(sname)
            src[sname] = sig
            for sp in sig[0].ports:
                for e in sp.endpoints:
                    u = e.backend_uid
                    if u not in wants:
                        wants[u] = sname
                    else:
                        self._want(u, sname)


def _malloc_trim() -> None:
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only; probe once
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


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
