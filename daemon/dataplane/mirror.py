"""The reconciler's memory of what the kernel maps hold, and how a plan updates it.

``load()`` rebuilds the mirror from the maps and the pinned names table, so a new process picks
up where the last one stopped; ``commit()`` records a Plan (plan.py) once it is applied.

Memory (100,000 backends must cost a few tens of MiB, not hundreds): the mirror keeps no
per-element objects. A backend is one uid -> id dict entry plus slots in id-indexed lists (the
``Backend`` last written, shared with the caller's projection, and a reference count); its
value, name and pod-IP frontend keys are re-derived from that ``Backend`` when needed. A service
port keeps its km_service value and, per priority, the packed km_endpoint values of slots
0..n-1 as one bytes object (the keys are implied by the slot numbers). Frontend ownership is one
dict token -> owner code: a backend id (> 0) for a pod IP, keyed by the Backend's own address
bytes (pod_tokens: no key object per pod), minus the service-port id (< 0) for a VIP:port, keyed
by its 20-byte key (a backend's code is the very int object stored as its id).
Services whose input object is unchanged since it was last written (identity, then equality) and
whose backends kept their ids are skipped by the planner without any per-endpoint work.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Mapping
from itertools import chain, repeat
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol

from daemon.dataplane import layout as L
from daemon.dataplane.model import Backend, Projection, Service
from daemon.dataplane.render import (
    RECONCILED_MAPS,
    V4MAPPED,
    decode_name,
    decode_wp,
    fe_key,
    routable,
    slot_backend_ids,
)

if TYPE_CHECKING:
    from daemon.dataplane.plan import Plan


def pod_tokens(b: Backend) -> list[bytes]:
    """The owner tokens of a backend's pod-IP frontends, in be_keys() order: the address itself
    (4 or 16 bytes, v4-mapped folded to v4), so the mirror keeps the Backend's own bytes object
    instead of a 20-byte key per pod. A VIP:port frontend's token is its key (20 bytes, port > 0):
    the two kinds never collide."""
    out = []
    for ip in (b.ipv4, b.ipv6):
        if ip and routable(ip):
            out.append(ip[12:] if len(ip) == 16 and ip[:12] == V4MAPPED else ip)
    return out if len(out) < 2 or out[0] != out[1] else out[:1]


def token_key(t: bytes) -> bytes:
    """The km_fe_key of an owner token (see pod_tokens)."""
    return t if len(t) == 20 else fe_key(t, 0)


def fe_token(k: bytes) -> bytes:
    """The owner token of a km_fe_key: a pod-IP key (port 0, as fe_key() makes it) -> its
    address; any other key (a VIP:port, a foreign entry) is its own token."""
    if k[16:18] != b"\0\0" or k[19]:
        return k
    if k[18] == L.AF_INET:
        return k[:4] if k[4:16] == _ZERO12 else k
    return k[:16] if k[18] == L.AF_INET6 and k[:12] != V4MAPPED else k


_ZERO12 = bytes(12)


class MapLike(Protocol):
    max_entries: int

    def update_raw(self, keys: bytes, values: bytes, n: int) -> None: ...
    def delete_batch(self, keys: list[bytes]) -> None: ...
    def dump(self) -> list[tuple[bytes, bytes]]: ...


class IdPool:
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

    def adopt(self, taken: list[int], ranges: list[range], free_at: int, nxt: int) -> None:
        """Take over what an IdView (plan.py) handed out: it looked at free[free_at:]."""
        del self.free[free_at:]
        for i in taken:
            self.mark(i)
        for r in ranges:  # below _LIMIT (IdView.pristine)
            if r:
                self.mark(r.stop - 1)  # grows `used`
                self.used[r.start:r.stop] = b"\x01" * len(r)
        self.next = max(self.next, nxt)

    def release(self, i: int) -> None:
        if self.is_used(i):
            if i >= self._LIMIT:
                self.big.discard(i)
            else:
                self.used[i] = 0
            self.free.append(i)


class Port:
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
        return sum(map(len, self.vals)) // 8


_ID, _NAME, _SERVICE, _VALUE, _VALS = (attrgetter(a) for a in ("id", "name", "service", "value", "vals"))


class Mirror:
    """What the reconciled maps hold, as far as this process knows (see module docstring)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits  # map -> max_entries
        self.reset()

    def reset(self) -> None:
        self.ports: dict[str, Port] = {}
        # service -> its port names: a str for one port (nearly every service), a tuple for several
        self.svc_ports: dict[str, str | tuple[str, ...]] = {}
        self.port_by_id: dict[int, Port] = {}
        self.be_id: dict[str, int] = {}  # backend uid -> id, for backends in the maps
        # id -> service(s) whose last rendered input names that backend: str, or a set when several
        self.be_want: list[str | set[str] | None] = [None]
        self.be_src: list[Backend | None] = [None]  # id -> the Backend last written (None: loaded)
        self.be_refs = array("i", [0])  # id -> number of service ports whose slots use it
        self.be_loaded: dict[int, Backend] = {}  # id -> Backend decoded by load(), until verified
        # frontend owner token (pod_tokens: a pod's address, else the key) -> backend id / -(port id)
        self.fe_owner: dict[bytes, int] = {}
        self.orphans: dict[str, list[bytes]] = {m: [] for m in RECONCILED_MAPS}
        self.svc_ids = IdPool()
        self.be_ids = IdPool()
        self._n_svc = 0  # ports with a km_service entry
        self._n_ep = 0  # endpoint slots
        # last rendered input per service and the backend ids it saw (None: that input was rejected,
        # so it is retried): an unchanged input is skipped
        self.src: dict[str, tuple[Service, tuple[int | None, ...] | None]] = {}
        # the same for backends without an id (not in the maps): uid -> service(s)
        self.wants: dict[str, str | set[str]] = {}
        self._held: list[tuple[IdPool, int]] = []  # orphan ids reserved until their cleanup
        # backends gone from the projection but kept in the maps (a rejected service still uses
        # them): services were rendered without them, so their return must re-render those
        self.kept: set[str] = set()

    def counts(self) -> dict[str, int]:
        """Entries per reconciled map, as the mirror knows them."""
        o = self.orphans
        nb = len(self.be_id)
        return {"frontend": len(self.fe_owner) + len(o["frontend"]),
                "service": self._n_svc + len(o["service"]),
                "endpoint": self._n_ep + len(o["endpoint"]),
                "backend": nb + len(o["backend"]),
                "names": len(self.ports) + nb + len(o["names"])}

    def port_names(self, service: str) -> tuple[str, ...]:
        """Names of a service's ports in the maps."""
        names = self.svc_ports.get(service, ())
        return (names,) if isinstance(names, str) else names

    def service_name(self, sid: int) -> str | None:
        p = self.port_by_id.get(sid)
        return p.service if p is not None else None

    def backend_uid(self, bid: int) -> str | None:
        b = self.backend_of(bid) if 0 < bid < len(self.be_src) else None
        return b.uid if b is not None else None

    def backend_of(self, bid: int) -> Backend | None:
        b = self.be_src[bid]
        return b if b is not None else self.be_loaded.get(bid)

    def _set_backend(self, bid: int, uid: str, b: Backend | None) -> None:
        n = len(self.be_src)
        if bid >= n:
            grow = bid + 1 - n
            self.be_want.extend([None] * grow)
            self.be_src.extend([None] * grow)
            self.be_refs.extend([0] * grow)
        self.be_id[uid] = bid
        self.be_want[bid] = self.wants.pop(uid, None)
        self.be_src[bid] = b
        self.be_ids.mark(bid)

    def load(self, maps: Mapping[str, MapLike]) -> None:
        """Rebuild from the live maps; entries nobody can name become orphans."""
        self.reset()
        names: dict[tuple[int, int], bytes] = {
            L.NAME_KEY.unpack(k): v for k, v in maps["names"].dump()}
        used_names: set[tuple[int, int]] = set()
        orphans = self.orphans

        # service ports: header + slots 0..n-1 per priority; other slots are orphans
        services = {L.U32.unpack(k)[0]: v for k, v in maps["service"].dump()}
        slots: dict[int, dict[tuple[int, int], bytes]] = {}
        for k, v in maps["endpoint"].dump():
            sid, prio, slot = L.EP_KEY.unpack(k)
            slots.setdefault(sid, {})[(prio, slot)] = v
        for sid in set(services) | set(slots):
            nm = names.get((L.NAME_SERVICE, sid))
            pname = decode_name(nm)[0] if nm else ""
            sname, _, port = pname.rpartition(":")
            mine = slots.pop(sid, {})
            if not sname or not port.isdigit() or pname in self.ports or sid >= IdPool._LIMIT:
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
            self._add_port(Port(sid, pname, sname, services.get(sid, b""), tuple(vals), ()))
            self.svc_ids.mark(sid)
        del services, slots

        # backends: decoded back into a Backend, verified against the projection on first sync
        limit = 2 * max(self.limits["backend"], 1) + 1024
        for k, val in maps["backend"].dump():
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
            self.be_loaded[bid] = b
        for key in names:
            if key not in used_names:
                orphans["names"].append(L.NAME_KEY.pack(*key))
                self._hold(self.svc_ids if key[0] == L.NAME_SERVICE else self.be_ids, key[1])
        del names

        fes: dict[int, list[bytes]] = {}
        for k, v in maps["frontend"].dump():
            kind, oid = L.FE_VAL.unpack(v)
            if kind == L.FE_SERVICE and oid in self.port_by_id:
                fes.setdefault(oid, []).append(k)
                self.fe_owner[k] = -oid
                continue
            if kind == L.FE_BACKEND and 0 < oid < len(self.be_src):
                b = self.be_loaded.get(oid)
                t = fe_token(k)
                if b is not None and t in pod_tokens(b):
                    self.fe_owner[t] = oid
                    continue
            orphans["frontend"].append(k)
            if kind == L.FE_SERVICE:
                self._hold(self.svc_ids, oid)
        for sid, keys in fes.items():
            self.port_by_id[sid].fes = tuple(sorted(keys))
        refs = self.be_refs
        for p in self.ports.values():
            for x in slot_backend_ids(p.vals):
                if x < len(refs) and self.backend_of(x) is not None:
                    refs[x] += 1

    def _add_port(self, p: Port) -> None:
        self.ports[p.name] = p
        cur = self.svc_ports.get(p.service)
        self.svc_ports[p.service] = p.name if cur is None else (*self.port_names(p.service), p.name)
        self.port_by_id[p.id] = p
        self._n_svc += 1 if p.value else 0
        self._n_ep += p.nslots()

    def _add_ports(self, ps: list[Port]) -> None:
        """_add_port of each of these ports (none in the mirror yet), with no statement per port
        when each service has one port (a first sync)."""
        names = list(map(_NAME, ps))
        services = list(map(_SERVICE, ps))
        if len(set(services)) != len(ps) or self.svc_ports.keys() & services:
            for p in ps:
                self._add_port(p)
            return
        self.ports.update(zip(names, ps, strict=True))
        self.svc_ports.update(zip(services, names, strict=True))
        self.port_by_id.update(zip(map(_ID, ps), ps, strict=True))
        self._n_svc += len(ps) - list(map(_VALUE, ps)).count(b"")
        self._n_ep += sum(map(len, chain.from_iterable(map(_VALS, ps)))) // 8

    def _drop_port(self, p: Port) -> None:
        self.ports.pop(p.name, None)
        names = tuple(n for n in self.port_names(p.service) if n != p.name)
        if names:
            self.svc_ports[p.service] = names[0] if len(names) == 1 else names
        else:
            self.svc_ports.pop(p.service, None)
        self.port_by_id.pop(p.id, None)
        code = -p.id
        for k in p.fes:
            if self.fe_owner.get(k) == code:
                del self.fe_owner[k]
        self._n_svc -= 1 if p.value else 0
        self._n_ep -= p.nslots()

    def _hold(self, pool: IdPool, i: int) -> None:
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

    def wanted_by(self, uid: str) -> str | set[str] | None:
        """The service(s) whose last rendered input names backend uid."""
        bid = self.be_id.get(uid)
        return self.be_want[bid] if bid is not None else self.wants.get(uid)

    def _set_want(self, uid: str, w: str | set[str] | None) -> None:
        bid = self.be_id.get(uid)
        if bid is not None:
            self.be_want[bid] = w
        elif w is None:
            self.wants.pop(uid, None)
        else:
            self.wants[uid] = w

    def _want(self, uid: str, sname: str) -> None:
        cur = self.wanted_by(uid)
        if cur is None:
            self._set_want(uid, sname)
        elif isinstance(cur, str):
            if cur != sname:
                self._set_want(uid, {cur, sname})
        else:
            cur.add(sname)

    def _unwant(self, uid: str, sname: str) -> None:
        cur = self.wanted_by(uid)
        if cur is None:
            return
        if isinstance(cur, str):
            if cur == sname:
                self._set_want(uid, None)
            return
        cur.discard(sname)
        if len(cur) == 1:
            self._set_want(uid, next(iter(cur)))
        elif not cur:
            self._set_want(uid, None)

    def _forget_src(self, sname: str) -> None:
        old = self.src.pop(sname, None)
        if old is None:
            return
        for sp in old[0].ports:
            for uid in sp.uids:
                self._unwant(uid, sname)

    def commit(self, plan: Plan, proj: Projection) -> None:
        """Record a plan as done (its writes are applied, or being applied)."""
        new_ports, new_backs, verified, delta = plan.ports, plan.backs, plan.verified, plan.refs
        kept_back, kept_now, pass_claims, wanted = plan.kept_back, plan.kept_now, plan.claims, plan.wanted
        new_src, orphans = plan.src, plan.orphans
        self.svc_ids.adopt(*plan.svc_ids)
        self.be_ids.adopt(*plan.be_ids)
        fe_owner, be_id, be_src, src, pb = self.fe_owner, self.be_id, self.be_src, self.src, proj.backends
        # --- commit to the mirror
        if orphans:
            self.orphans = {m: [] for m in RECONCILED_MAPS}
            for pool, i in self._held:
                pool.release(i)
            self._held = []
        if not self.ports and new_ports and None not in new_ports.values():  # a first sync: in bulk
            self._add_ports(list(new_ports.values()))
            new_ports = {}
        for pname, p in new_ports.items():
            cur = self.ports.get(pname)
            if cur is not None:
                self._drop_port(cur)
                if p is None:
                    self.svc_ids.release(cur.id)
            if p is not None:
                self._add_port(p)
        self.kept.difference_update(kept_back)
        self.kept.update(kept_now)
        for bid, b in verified:
            be_src[bid] = b
            self.be_loaded.pop(bid, None)
        top = max(filter(None, new_backs.values()), default=0)  # ids are >= 1; None: removed
        if top >= len(be_src):
            grow = top + 1 - len(be_src)
            self.be_want.extend([None] * grow)
            be_src.extend([None] * grow)
            self.be_refs.extend([0] * grow)
        be_want, wants = self.be_want, self.wants
        bulk = plan.be_ids[1]
        if (not be_id and not self.be_loaded and len(bulk) == 1 and len(bulk[0]) == len(new_backs)
                and not plan.be_ids[0]):
            # a first sync whose backends all took consecutive ids, in order (plan._bulk_backends)
            be_id.update(new_backs)
            r = bulk[0]
            be_src[r.start:r.stop] = plan.bulk_src if len(plan.bulk_src) == len(r) else map(
                pb.__getitem__, new_backs)
            for uid in wants.keys() & new_backs.keys():  # named before they had an id
                be_want[new_backs[uid]] = wants.pop(uid)
            new_backs = {}
        for uid, nb in new_backs.items():
            bid = be_id.get(uid)
            if bid is not None:  # changed or removed: forget its current pod-IP frontends
                cur_b = self.backend_of(bid)
                code = bid
                if cur_b is not None:
                    for t in pod_tokens(cur_b):
                        if fe_owner.get(t) == code:
                            del fe_owner[t]
                self.be_loaded.pop(bid, None)
            if nb is None:
                self.kept.discard(uid)
                if bid is not None:
                    del be_id[uid]
                    w = be_want[bid]
                    if w is not None:
                        wants[uid] = w
                        be_want[bid] = None
                    be_src[bid] = None  # its reference count is 0 once `delta` is applied below
                    self.be_ids.release(bid)
                continue
            nbid = nb
            b = pb[uid]
            w = be_want[bid] if bid is not None else wants.pop(uid, None)
            if bid is not None:
                be_want[bid] = None
            be_id[uid] = nbid
            be_want[nbid] = w
            be_src[nbid] = b
        # every frontend key accepted in this pass (the key objects made while planning are kept)
        if not fe_owner:
            fe_owner.update(pass_claims)
            pass_claims = {}
        for k, code in pass_claims.items():
            owner = fe_owner.get(k)
            if owner is None:
                fe_owner[k] = code
            elif owner != code:
                self._claim(k, code)
        refs = self.be_refs
        once = plan.refs_once  # ids each named by one more slot (a bulk first sync: delta is empty)
        if once and not delta and once.stop <= len(refs) and refs.count(0) == len(refs):
            refs[once.start:once.stop] = array("i", [1]) * len(once)
        elif once:
            delta = Counter(delta)
            delta.update(once)
        lo, hi = (min(delta), max(delta)) if delta else (0, -1)
        if (hi - lo + 1 == len(delta) and hi < len(refs) and list(delta.values()).count(1) == len(delta)
                and refs.count(0) == len(refs)):  # a first sync: ids lo..hi each used by one port
            refs[lo:hi + 1] = array("i", [1]) * len(delta)
        elif delta and hi < len(refs):  # with no statement per backend
            bids = list(delta)
            list(map(refs.__setitem__, bids, map(int.__add__, map(refs.__getitem__, bids), delta.values())))
        else:
            for bid, dv in delta.items():
                if bid < len(refs):
                    refs[bid] += dv
        for sname, (_svc, want, _same) in wanted.items():
            if not want:
                self._forget_src(sname)
        for sname, sig in new_src.items():
            if sname in src:
                self._forget_src(sname)
            src[sname] = sig
        if not new_src:
            return
        if be_want.count(None) == len(be_want):  # nothing named yet by id: a first sync
            # the backend ids each service saw when it was planned (its signature) are the ids
            # they have now: spread the service names by id with no lookup per endpoint
            sigs = [sig[1] for sig in new_src.values()]
            if None not in sigs:
                ids = list(chain.from_iterable(sigs))
                if None not in ids and ids and ids == list(range(ids[0], ids[0] + len(ids))):
                    # ids in signature order are consecutive (each backend named once): one slice
                    be_want[ids[0]:ids[0] + len(ids)] = chain.from_iterable(
                        map(repeat, new_src.keys(), map(len, sigs)))
                    return
                if None not in ids:
                    list(map(be_want.__setitem__, ids, chain.from_iterable(
                        map(repeat, new_src.keys(), map(len, sigs)))))
                    if be_want.count(None) == len(be_want) - len(ids):
                        return
                    for bid in ids:  # a backend named twice: undo, take the general way
                        be_want[bid] = None
        # uid -> service(s) newly naming it, then spread by id
        uids: list[str] = []
        snames: list[str] = []
        for sname, sig in new_src.items():
            ports = sig[0].ports
            named = [u for sp in ports for u in sp.uids]
            if len(ports) > 1:
                named = list(dict.fromkeys(named))
            uids += named
            snames += [sname] * len(named)
        acc: dict[str, str | set[str]] = dict(zip(uids, snames, strict=True))
        if len(acc) != len(uids):  # a backend named by several services (or twice by one port)
            acc = {}
            for u, sname in zip(uids, snames, strict=True):
                cur = acc.get(u)
                if cur is None:
                    acc[u] = sname
                elif isinstance(cur, str):
                    if cur != sname:
                        acc[u] = {cur, sname}
                else:
                    cur.add(sname)
        del uids, snames
        ids = list(map(be_id.get, acc))
        if None not in ids and (be_want.count(None) == len(be_want)  # nothing named yet: a first sync
                                or list(map(be_want.__getitem__, ids)).count(None) == len(ids)):
            list(map(be_want.__setitem__, ids, acc.values()))  # the common case: no one named them yet
            return
        for uid, w in acc.items():
            if isinstance(w, str):
                self._want(uid, w)
            else:
                for sname in w:
                    self._want(uid, sname)
