"""The pure half of a reconcile pass: desired Projection vs the mirror -> an ordered Plan.

A plan lists, per map, the elements to delete or write in three phases:

  free   delete frontends no longer wanted, then service entries and all endpoint slots of
         service ports that are gone (nothing points at them once their frontends are)
  write  backends, names, endpoint slots, service headers (counts), frontends
  trim   delete endpoint slots beyond the new counts, then backends nobody references

so a frontend never points at a missing service, a count never covers a missing slot and a slot
never names a missing backend. Capacity is checked before anything is planned for a service: a
service that does not fit (or whose VIP:port belongs to another service) gets no element in the
plan and is reported in ``Plan.rejected``; its previous entries (if any) stay as they were.

make_plan() reads the mirror and never changes it (ids come from IdView, a copy-on-write view
of the mirror's pools); Mirror.commit() applies a plan's bookkeeping once the applier (apply.py)
has written it. Writes are packed straight into bytearrays (``Writes``): a 430k-element first
sync leaves no per-element objects behind.
"""

from __future__ import annotations

import struct
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat
from operator import attrgetter

from daemon.dataplane import layout as L
from daemon.dataplane.mirror import IdPool, Mirror, Port, fe_token, pod_tokens, token_key
from daemon.dataplane.model import Backend, LbMode, Projection, Service
from daemon.dataplane.render import (
    BE_TAIL_PLAIN,
    EMPTY_VALS,
    EPV,
    SVC_HEAD,
    ZERO4,
    ZERO16,
    bad_backend,
    bad_service,
    be_tail,
    encode_name,
    fe_key,
    fmt_fe,
    htons,
    port_name,
    random_header,
    render_backend,
    render_slots,
    render_wp,
    routable,
    slot_backend_ids,
)

_NO = object()
_BE_PLAIN = L.BE_VAL.pack(ZERO4, ZERO16, 0, *BE_TAIL_PLAIN)  # km_backend of a plain pod: no waypoint
_FE4 = struct.Struct("=4s14xBB")  # km_fe_key of an IPv4 pod IP (port 0)
_V4_FLAGS = L.U32.pack(L.BE_HAS_V4)


_BE_WORDS = L.BE_VAL.size // 4
_FE_WORDS = L.FE_KEY.size // 4
_FE4_WORDS = array("I", _FE4.pack(ZERO4, L.AF_INET, 0))
_FE_BACKEND_WORDS = array("I", [L.FE_BACKEND, 0])
_BE_V4_TAIL_WORDS = array("I", bytes(4) + _BE_PLAIN[4:20] + _V4_FLAGS + _BE_PLAIN[24:])  # ip4 first
_CHUNK = 4096
_NAMES = struct.Struct(f"={_CHUNK * L.NAME_VAL.format[1:]}")  # a chunk of km_names values
_EPK_RUN = 256
_EPK = [array("I", [x for s in range(_EPK_RUN) for x in (0, prio, s)]) for prio in range(L.PRIOS)]
assert _EPK[1][:3].tobytes() == L.EP_KEY.pack(0, 1, 0)  # km_ep_key is three native u32
# km_service values kept by the mirror, one object per distinct value: it depends on the lb mode,
# the slot counts and the waypoint only, so 10,000 ports of 10 endpoints share one
_VALUES: dict[bytes, bytes] = {}
_IP4, _IP6, _WP, _HANDOFF, _UID, _NAME, _NS = (attrgetter(a) for a in (
    "ipv4", "ipv6", "waypoint", "handoff_port", "uid", "name", "namespace"))
# a workload record's C slots and its profile's plain attributes (_records_v4, _backend_names)
_ADDR, _PROFILE, _P_WP, _P_PROXY, _P_NS = (attrgetter(a) for a in (
    "_addr", "profile", "waypoint", "proxy_port", "profile.namespace"))


def _bulk_backends(order: list[str], pb: dict[str, Backend], alloc: IdView, room: tuple[int, int, int],
                   bw: Writes, nw: Writes, fw: Writes, claims: dict[bytes, int],
                   new_backs: dict[str, int | None], bulk_src: list[Backend]) -> bool:
    """_new_backends for the common first sync, with no per-backend statement: every backend in
    order exists, is IPv4-only with a distinct routable pod IP, has no waypoint role, and all
    fit; ids are fresh and consecutive. False (nothing done) when any of that does not hold.
    bulk_src receives the Backends in id order, for Mirror.commit."""
    n = len(order)
    if not n or n > min(room) or not alloc.pristine():
        return False
    if n == len(pb) and order == list(pb):  # sync(): the projection's own order, no lookups
        bs = list(pb.values())
    else:
        try:
            bs = list(map(pb.__getitem__, order))
        except KeyError:
            return False
    # the checks run in C (map/count/join), not one Python statement per backend
    ip4s = _records_v4(bs)
    if ip4s is None:
        if (list(map(_IP6, bs)).count(None) != n or list(map(_WP, bs)).count(None) != n
                or any(map(_HANDOFF, bs))):
            return False
        ip4s = list(map(_IP4, bs))
    if None in ip4s or ZERO4 in ip4s:
        return False
    try:
        packed = b"".join(ip4s)
    except TypeError:
        return False
    if len(packed) != 4 * n or 127 in packed[0::4]:  # 4 * n bytes from n objects of len >= 1
        return False
    if len(set(map(len, ip4s))) != 1:  # a 3-byte and a 5-byte address would also make 4 * n
        return False
    ids = list(alloc.take_range(n))  # one int object per id, shared by every dict below
    # owner tokens: the Backends' own address objects. Built straight into an empty claims (a
    # first sync's): every 1M-entry dict built or copied costs ~0.2-0.3 s at 1M backends (cache
    # misses), ~10x less per element at 100k
    owners = claims if not claims else {}
    owners.update(zip(ip4s, ids, strict=True))
    if len(owners) < n:  # two backends share a pod IP: the loop decides who gets it
        owners.clear()
        alloc.untake_range(range(ids[0], ids[0] + n))
        return False
    if owners is not claims:
        claims.update(owners)
    new_backs.update(zip(order, ids, strict=True))
    idarr = array("I", ids)
    bw.keys = bytearray(idarr)
    ip4w = array("I", packed)
    bw.vals = _tiled(_BE_V4_TAIL_WORDS, n, 0, ip4w)  # 12 words a backend: ip4 first, the rest constant
    fk = _tiled(_FE4_WORDS, n, 0, ip4w)  # km_fe_key: ip4, zeros, port 0, AF_INET
    fv = _tiled(_FE_BACKEND_WORDS, n, 1, idarr)  # km_fe_val: FE_BACKEND, backend id
    if fw.n or fw.keys:
        fw.keys += fk
        fw.vals += fv
    else:
        fw.keys, fw.vals = fk, fv
    bulk_src[:] = bs  # their names: _backend_names(), in chunks
    return True


def _records_v4(bs: list[Backend]) -> list[bytes] | None:
    """The IPv4 addresses of bs when every one is a workload record (daemon.state.WorkloadRecord:
    one address, as bytes) holding one IPv4 address, and no profile has a waypoint or a PROXY
    hand-off port; else None (the caller checks the Backend fields one by one).

    Why: ipv4, ipv6, waypoint and handoff_port are Python properties of a record, so four passes
    over them ran 4 Python frames a backend (~30 ms at 100k backends, ~0.4 s at 1M); the raw
    address is a C slot and the profiles are shared (one per deployment), so they are checked once."""
    try:
        addrs = list(map(_ADDR, bs))
        profs = list(map(_PROFILE, bs))
    except AttributeError:  # a Backend (a workload with its own waypoint, resolved): not a record
        return None
    if set(map(type, addrs)) != {bytes} or set(map(len, addrs)) != {4}:
        return None
    uniq = list(dict(zip(map(id, profs), profs, strict=True)).values())  # by identity (no __eq__)
    if list(map(_P_WP, uniq)).count(None) != len(uniq) or any(map(_P_PROXY, uniq)):
        return None
    return addrs


def _tiled(template: array, n: int, at: int, column: array) -> bytearray:
    """n copies of template's words with word `at` of each taken from column, built in place: a
    first sync's buffers are tens of MB at 1M backends, and every copy of one is fresh memory
    to fault in (the array-then-bytearray way touched twice the pages)."""
    buf = bytearray(template.tobytes()) * n
    with memoryview(buf) as mv, mv.cast("I") as words:
        words[at::len(template)] = column
    return buf


def _backend_names(bs: list[Backend], first: int) -> Iterator[Writes]:
    """km_names writes of backends with the consecutive ids first, first + 1, ... in chunks of
    _CHUNK (1 MiB of values): a first sync's names are written a chunk at a time, never held at
    once (256 MB at 1M backends)."""
    for i in range(0, len(bs), _CHUNK):
        part = bs[i:i + _CHUNK]
        n = len(part)
        wr = Writes()
        nk = array("I", [L.NAME_BACKEND]) * (2 * n)
        nk[1::2] = array("I", range(first + i, first + i + n))
        wr.keys = bytearray(nk)
        wr.vals = bytearray(L.NAME_LEN * n)
        try:
            nss = list(map(_P_NS, part))  # records: their profile's (the property is a Python frame)
        except AttributeError:
            nss = list(map(_NS, part))
        _pack_names(wr.vals, 0, list(map(str.encode, map("\0".join, zip(map(_UID, part), map(_NAME, part),
                                                                          nss, strict=True)))))
        wr.n = n
        yield wr


def _EPV_WORD(tp: int) -> int:  # noqa: N802 - a constant-like helper
    """The second native u32 of a km_ep_val for this target port (port in network order, 0)."""
    return array("I", EPV.pack(0, htons(tp), 0))[1]


def _pack_names(buf: bytearray, at: int, raw: list[bytes]) -> None:
    """km_names values of these encoded names into buf from element at: each cut as
    encode_name() cuts it (the last byte stays NUL) and padded with NULs, in C."""
    if max(map(len, raw), default=0) > L.NAME_LEN - 1:
        raw = [r[:L.NAME_LEN - 1] for r in raw]
    names = _NAMES if len(raw) == _CHUNK else struct.Struct(f"={len(raw) * L.NAME_VAL.format[1:]}")
    names.pack_into(buf, L.NAME_LEN * at, *raw)


def _bulk_services(wanted: dict[str, tuple[Service | None, dict[str, int], bool]],
                   override: dict[str, int | None], usage: dict[str, int], limits: dict[str, int],
                   alloc: IdView, ew: Writes, sw: Writes,
                   nw: Writes, fw: Writes, pass_claims: dict[bytes, int], new_ports: dict[str, Port | None],
                   new_src: dict[str, tuple[Service, tuple[int | None, ...] | None]],
                   in_order: list[str] | None = None) -> dict[int, int] | range | None:
    """The service stage of a first sync (the mirror holds no port, no frontend and no backend
    id), for the common input: every wanted port is RANDOM, weight 1, one valid target port,
    no waypoint, every endpoint's backend got an id in this pass, and everything fits with no
    VIP:port claimed twice. Then the per-service loop would accept every port, in order, so
    its writes are packed here in bulk (the same elements in the same order) and the backend
    reference counts are returned: a range when each id of it is named by exactly one slot. None
    (nothing done) when any of that does not hold.

    in_order: the backends of this pass in the order they took consecutive ids (override holds
    them in that order), when that is so: see _runs_of."""
    pnames: list[str] = []
    snames: list[str] = []
    cols: list[tuple[str, ...]] = []
    tps: list[int] = []
    fes_l: list[tuple[bytes, ...]] = []
    srcs: list[tuple[str, Service]] = []
    for sname, (svc, want, _same) in wanted.items():
        if not want or svc is None:
            continue
        if svc.lb_mode != LbMode.RANDOM or svc.waypoint is not None or bad_service(svc):
            return None
        ports = svc.ports
        srcs.append((sname, svc, len(cols) if len(ports) == 1 else -1))
        for pname, i in (want.items() if len(want) == 1 else sorted(want.items())):
            sp = ports[i]
            u = sp.uniform
            uids = sp.uids
            if u is None or (uids and (u[1] != 1 or not 0 < u[0] < 65536)):
                return None
            pnames.append(pname)
            snames.append(sname)
            cols.append(uids)
            tps.append(u[0] if uids else tps[-1] if tps else 1)  # an empty port renders no slot
            port = sp.port
            vips = svc.vips
            fes_l.append((fe_key(vips[0], port),) if len(vips) == 1 else tuple(sorted({fe_key(vip, port)
                                                                                      for vip in vips})))
    if not pnames:
        return None
    counts = list(map(len, cols))
    ovget = override.get
    live = _runs_of(cols, counts, override, in_order) if in_order is not None else None
    each_once = live is not None
    if live is None:
        live = list(map(ovget, chain.from_iterable(cols)))  # in endpoint order, as the signatures
        if None in live:
            return None
    srt = list(map(tuple, map(sorted, cols)))  # slots are in (uid, ...) order: nearly always already
    ids = live if srt == cols else list(map(ovget, chain.from_iterable(srt)))
    keys = list(chain.from_iterable(fes_l))
    if len(set(keys)) != len(keys):  # a VIP:port wanted twice: the loop rejects the later one
        return None
    np_, ns, nf = len(pnames), len(ids), len(keys)
    need = {"frontend": nf, "service": np_, "endpoint": ns, "names": np_}
    if any(usage[k] + n > limits[k] for k, n in need.items()):
        return None
    sids = list(alloc.take_range(np_)) if alloc.pristine() else [alloc.take() for _ in range(np_)]
    for k, n in need.items():
        usage[k] += n
    # km_endpoint: key (sid, 0, slot), value (backend id, htons(target port), 0)
    ek = array("I", [0]) * (3 * ns)
    ek[0::3] = array("I", chain.from_iterable(map(repeat, sids, counts)))
    ek[2::3] = array("I", chain.from_iterable(map(range, counts)))
    ev = array("I", [0]) * (2 * ns)
    ev[0::2] = array("I", ids)
    if len(set(tps)) == 1:
        ev[1::2] = array("I", [_EPV_WORD(tps[0])]) * ns
    else:
        ev[1::2] = array("I", chain.from_iterable(map(repeat, map(_EPV_WORD, tps), counts)))
    evb = ev.tobytes()
    ends = list(accumulate(counts))
    blobs = [evb[8 * (e - c):8 * e] for e, c in zip(ends, counts, strict=True)]
    values = list(map(random_header, counts))
    valss = zip(blobs, *[repeat(b"")] * (L.PRIOS - 1), strict=False)  # (slots of prio 0, b"", ...)
    ports = list(map(Port, sids, pnames, snames, values, valss, fes_l))
    new_ports.update(zip(pnames, ports, strict=True))
    ew.keys += ek
    ew.vals += evb
    ew.n += ns
    sida = array("I", sids)
    sw.keys += sida
    sw.vals += b"".join(values)
    sw.n += np_
    nk = array("I", [L.NAME_SERVICE]) * (2 * np_)
    nk[1::2] = sida
    nw.keys += nk
    at = len(nw.vals) // L.NAME_LEN
    nw.vals += bytes(L.NAME_LEN * np_)
    for i in range(0, np_, _CHUNK):
        _pack_names(nw.vals, at + i, [p.encode() for p in pnames[i:i + _CHUNK]])
    nw.n += np_
    owners = list(chain.from_iterable(map(repeat, sids, map(len, fes_l))))
    fw.keys += b"".join(keys)
    fv = array("I", [L.FE_SERVICE]) * (2 * nf)
    fv[1::2] = array("I", owners)
    fw.vals += fv
    fw.n += nf
    pass_claims.update(zip(keys, map(int.__neg__, owners), strict=True))
    for sname, svc, j in srcs:
        if j >= 0:  # one port: its signature is its column's ids
            new_src[sname] = (svc, tuple(live[ends[j] - counts[j]:ends[j]]))
        else:
            new_src[sname] = (svc, tuple(map(ovget, [u for sp in svc.ports for u in sp.uids])))
    if each_once and ids is live:  # the pass's consecutive ids, each in one slot
        return range(min(live), max(live) + 1)
    once = dict.fromkeys(ids, 1)
    if len(once) == ns:  # no backend in two slots: each is referenced by one port
        return once
    delta: Counter[int] = Counter()
    delta.update(chain.from_iterable(map(set, map(ids.__getitem__, map(slice, map(int.__sub__, ends, counts),
                                                                          ends)))))
    return delta


def _runs_of(cols: list[tuple[str, ...]], counts: list[int], override: dict[str, int | None],
             in_order: list[str]) -> list[int] | None:
    """The ids of the endpoints of cols, in order, when each column is a run of in_order (the
    backends that took consecutive ids in this pass, override holding them in that order) and
    the columns together name every one of those backends exactly once; else None.

    Why: a push lists a service's pods together, so a column is one run of the backends' order.
    Then one lookup a column (its first uid) and a pointer comparison of the run replace a
    lookup an endpoint, and the reference counts need no dict: at 1M endpoints those were ~1 s
    of cache misses (a 1M-entry dict probed at random), at 100k ~0.03 s."""
    n = len(in_order)
    if len(override) != n or sum(counts) != n or not n:
        return None
    ovget = override.get
    order = tuple(in_order)
    vals = list(override.values())
    base = vals[0]
    seen = bytearray(n)
    ones = b"\1" * max(counts)
    live: list[int] = []
    add = live.extend
    for col, c in zip(cols, counts, strict=True):
        if not c:
            continue
        b = ovget(col[0])
        if b is None:
            return None
        k = b - base
        if order[k:k + c] != col:
            return None
        seen[k:k + c] = ones[:c]
        add(vals[k:k + c])
    if seen.count(0):  # n slots in all, so a position not seen means another seen twice
        return None
    return live


def _new_backends(order: list[str], pb: dict[str, Backend], alloc: IdView, rejected: dict[str, str],
                  usage: tuple[int, int, int], limits: dict[str, int], bw: Writes, nw: Writes, fw: Writes,
                  claims: dict[bytes, int], new_backs: dict[str, int | None], bulk_src: list[Backend]
                  ) -> tuple[int, int, int]:
    """The backend stage when the mirror holds no backend and no frontend (a first sync): every
    backend is new and nothing is released, so the general loop's comparisons are skipped and the
    values are packed in place into preallocated buffers. Returns the new usage (bulk_src: see
    _bulk_backends). Every id is new, so new_backs is also the pass's override (make_plan uses
    the one dict as both: a second 1M-entry copy cost ~0.17 s at 1M backends)."""
    u_be, u_nm, u_fe = usage
    lim_be, lim_nm, lim_fe = limits["backend"], limits["names"], limits["frontend"]
    if _bulk_backends(order, pb, alloc, (lim_be - u_be, lim_nm - u_nm, lim_fe - u_fe), bw, nw, fw, claims,
                      new_backs, bulk_src):
        n = len(new_backs)
        return u_be + n, u_nm + n, u_fe + n
    n = len(order)
    bsz, nsz = L.BE_VAL.size, L.NAME_VAL.size
    bk, bv = bytearray(4 * n), bytearray(_BE_PLAIN * n)
    nk, nv = bytearray(L.NAME_KEY.size * n), bytearray(nsz * n)
    fk, fv = fw.keys.extend, fw.vals.extend
    u32_into, namekey_into, fevpack, fe4 = L.U32.pack_into, L.NAME_KEY.pack_into, L.FE_VAL.pack, _FE4.pack
    bepack, take, release, get = L.BE_VAL.pack, alloc.take, alloc.release, pb.get
    kind, be_kind, af4, v4flags, top = L.NAME_BACKEND, L.FE_BACKEND, L.AF_INET, _V4_FLAGS, L.NAME_LEN - 1
    j = 0
    for uid in order:
        b = get(uid)
        if b is None:
            continue
        ip4, ip6 = b.ipv4, b.ipv6
        if (ip4 is not None and len(ip4) != 4) or (ip6 is not None and len(ip6) != 16):
            rejected[f"backend/{uid}"] = bad_backend(b)
            continue
        bid = take()
        if ip6:
            keys = pod_tokens(b)
        elif ip4 and ip4[0] != 127 and ip4 != ZERO4:
            keys = [ip4]
        else:
            keys = []
        fes = [k for k in keys if claims.get(k, bid) == bid]
        full = "backend" if u_be >= lim_be else "names" if u_nm >= lim_nm else \
            "frontend" if u_fe + len(fes) > lim_fe else ""
        if full:
            rejected[f"backend/{uid}"] = f"{full} map full ({limits[full]} entries)"
            release(bid)
            continue
        u_be += 1
        u_nm += 1
        u_fe += len(fes)
        new_backs[uid] = bid
        u32_into(bk, 4 * j, bid)
        off = bsz * j
        if ip6 is None and b.waypoint is None and not b.handoff_port:
            bv[off:off + 4] = ip4
            bv[off + 20:off + 24] = v4flags
        else:
            flags = (L.BE_HAS_V4 if ip4 else 0) | (L.BE_HAS_V6 if ip6 else 0)
            bv[off:off + bsz] = bepack(ip4 or ZERO4, ip6 or ZERO16, flags, *be_tail(b))
        namekey_into(nk, 8 * j, kind, bid)
        name = f"{uid}\0{b.name}\0{b.namespace}".encode()[:top]
        off = nsz * j
        nv[off:off + len(name)] = name
        for k in fes:
            claims[k] = bid
            fk(fe4(k, af4, 0) if len(k) == 4 else token_key(k))
            fv(fevpack(be_kind, bid))
        j += 1
    del bk[4 * j:], bv[bsz * j:], nk[8 * j:], nv[nsz * j:]
    bw.keys, bw.vals, nw.keys, nw.vals = bk, bv, nk, nv
    return u_be, u_nm, u_fe


class Writes:
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


class IdView:
    """Ids taken from an IdPool without changing it: what the pool would hand out, minus what
    this plan already took; release() gives an id back to the plan. done() lists the ids the
    plan kept, for Mirror.commit to mark in the pool."""

    __slots__ = ("pool", "free_at", "next", "taken", "back", "ranges")

    def __init__(self, pool: IdPool) -> None:
        self.pool = pool
        self.free_at = len(pool.free)  # pool.free[:free_at] not yet looked at (taken from the end)
        self.next = pool.next
        self.taken: dict[int, None] = {}  # in order taken
        self.back: list[int] = []
        self.ranges: list[range] = []  # taken in bulk, above every other id taken

    def take(self) -> int:
        taken = self.taken
        if self.back:
            i = self.back.pop()
            taken[i] = None
            return i
        pool = self.pool
        while self.free_at:
            self.free_at -= 1
            i = pool.free[self.free_at]
            if not pool.is_used(i) and i not in taken:
                taken[i] = None
                return i
        i = self.next
        while pool.is_used(i) or i in taken:
            i += 1
        self.next = i + 1
        taken[i] = None
        return i

    def release(self, i: int) -> None:
        del self.taken[i]
        self.back.append(i)

    def pristine(self) -> bool:
        """Nothing handed back, no free list, nothing used at or above the cursor: take() would
        return next, next + 1, ..."""
        pool = self.pool
        return (not self.back and not self.free_at and not pool.big and pool.used.find(1, self.next) < 0
                and self.next + (1 << 24) < pool._LIMIT)

    def take_range(self, n: int) -> range:
        """n consecutive ids (only when pristine())."""
        ids = range(self.next, self.next + n)
        self.next += n
        self.ranges.append(ids)
        return ids

    def untake_range(self, ids: range) -> None:
        self.ranges.remove(ids)
        self.next = ids.start

    def done(self) -> tuple[list[int], list[range], int, int]:
        """(ids kept, ranges kept, how much of pool.free was looked at, the pool's next cursor)."""
        return list(self.taken), self.ranges, self.free_at, self.next


@dataclass
class Plan:
    """One pass: the map operations in their safe order, and what Mirror.commit records."""

    free: list[tuple[str, list[bytes]]] = field(default_factory=list)  # phase 1: (map, keys)
    early: list[tuple[str, Writes]] = field(default_factory=list)  # phase 2 writes handed out early
    write: list[tuple[str, Writes]] = field(default_factory=list)  # phase 2: (map, packed writes)
    trim: list[tuple[str, list[bytes]]] = field(default_factory=list)  # phase 3: (map, keys)
    rejected: dict[str, str] = field(default_factory=dict)  # service / "backend/<uid>" -> why
    # bookkeeping for Mirror.commit
    orphans: bool = False
    ports: dict[str, Port | None] = field(default_factory=dict)  # port name -> new state / None gone
    backs: dict[str, int | None] = field(default_factory=dict)  # uid -> id written / None removed
    verified: list[tuple[int, Backend]] = field(default_factory=list)
    refs: dict[int, int] = field(default_factory=dict)  # backend id -> reference count change
    refs_once: range = range(0)  # and each of these ids + 1 (a bulk first sync's; refs is then empty)
    kept_back: list[str] = field(default_factory=list)
    kept_now: list[str] = field(default_factory=list)
    claims: dict[bytes, int] = field(default_factory=dict)  # frontend key -> owner code
    wanted: dict[str, tuple[Service | None, dict[str, int], bool]] = field(default_factory=dict)
    src: dict[str, tuple[Service, tuple[int | None, ...] | None]] = field(default_factory=dict)
    svc_ids: tuple[list[int], list[range], int, int] = ([], [], 0, 1)
    be_ids: tuple[list[int], list[range], int, int] = ([], [], 0, 1)
    bulk_src: list[Backend] = field(default_factory=list)  # a bulk first sync's Backends, in id order

    def ops(self) -> list[tuple[str, str, object]]:
        """("delete", map, keys) / ("write", map, Writes) in execution order, early writes first."""
        return ([("write", n, wr) for n, wr in self.early if wr.n]
                + [("delete", n, ks) for n, ks in self.free]
                + [("write", n, wr) for n, wr in self.write]
                + [("delete", n, ks) for n, ks in self.trim])

    def size(self) -> int:
        """Elements written plus deleted."""
        return (sum(wr.n for _n, wr in self.early) + sum(wr.n for _n, wr in self.write)
                + sum(len(ks) for _n, ks in self.free) + sum(len(ks) for _n, ks in self.trim))


def make_plan(m: Mirror, proj: Projection, svc_scope: set[str], be_order: list[str], orphans: bool,
              early_min: int = 1 << 62, on_early: Callable[[list[tuple[str, Writes]]], None] | None = None
              ) -> Plan:
    """The writes and deletes that take the maps from what mirror m holds to proj, for the
    services in svc_scope and the backends in be_order (orphans: also delete every orphan).

    Pure with respect to m: ids are allocated from views of its pools and everything the pass
    changes is returned in the Plan for Mirror.commit. on_early (if given) receives the
    backend and backend-name writes as soon as they are planned, when they are at least
    early_min elements, so that the applier can write them while the services are planned:
    they only add ids nothing references yet or change values in place, so writing them before
    phase 1 is as safe as in phase 2."""
    rejected: dict[str, str] = {}
    svc_alloc, be_alloc = IdView(m.svc_ids), IdView(m.be_ids)
    p1: dict[str, list[bytes]] = {"frontend": [], "service": [], "endpoint": []}
    p3: dict[str, list[bytes]] = {"endpoint": [], "backend": [], "names": []}
    w = {name: Writes() for name in ("backend", "names", "endpoint", "service", "frontend")}
    usage = m.counts()
    limits = m.limits
    new_ports: dict[str, Port | None] = {}  # port name -> planned state (None = removed)
    new_backs: dict[str, int | None] = {}  # uid -> id written in this pass / None = removed
    verified: list[tuple[int, Backend]] = []  # loaded backends found exact: adopt their source
    fe_owner = m.fe_owner
    be_id = m.be_id

    if orphans:
        for name in ("frontend", "service", "endpoint"):
            p1[name].extend(m.orphans[name])
            usage[name] -= len(m.orphans[name])
        p3["backend"].extend(m.orphans["backend"])
        p3["names"].extend(m.orphans["names"])

    # --- what each in-scope service wants, and which frontend keys get released
    src = m.src
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
                want.setdefault(port_name(sname, sp.port), i)
        wanted[sname] = (svc, want, same_input)
        if same_input:
            continue  # the same ports and VIPs as written: nothing released
        for pname in m.port_names(sname):
            cur = m.ports[pname]
            if pname not in want:
                released.update(cur.fes)
            elif svc is not None:
                port = svc.ports[want[pname]].port
                keep = {fe_key(v, port) for v in svc.vips if len(v) in (4, 16)}
                released.update(k for k in cur.fes if k not in keep)
    pb = proj.backends
    for uid in (be_order if be_id else ()):  # (a first sync: no backend has an id to release)
        bid = be_id.get(uid)
        if bid is None:
            continue
        b = pb.get(uid)
        cur_b = m.backend_of(bid)
        if b is cur_b or cur_b is None:
            continue
        keep = set(pod_tokens(b)) if b is not None and not bad_backend(b) else set()
        code = bid
        released.update(k for k in pod_tokens(cur_b) if k not in keep and fe_owner.get(k) == code)

    pass_claims: dict[bytes, int] = {}  # keys accepted for an owner in this pass
    claim_names: dict[bytes, str] = {}

    def owner_name(key: bytes) -> str:
        code = fe_owner.get(key, 0)
        oid = abs(code)
        if code < 0 and oid in m.port_by_id:
            return m.port_by_id[oid].name
        uid = m.backend_uid(oid) if code > 0 else None
        return uid or f"#{oid}"

    def claimable(key: bytes, code: int) -> bool:
        if pass_claims.get(key, code) != code:
            return False
        owner = fe_owner.get(key)
        return owner is None or owner == code or key in released

    def drop_port(cur: Port, count_usage: bool = True) -> None:
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
            for pname in sorted(m.port_names(sname)):
                drop_port(m.ports[pname])

    # --- backends (adds and changes; removals are decided after the services)
    removed_backs: list[tuple[str, int]] = []
    kept_back: list[str] = []  # uids leaving m.kept in this pass
    bulk_src: list[Backend] = []
    override: dict[str, int | None] = {}  # backends whose id changes in this pass
    be_src = m.be_src
    bw, nw, fw = w["backend"], w["names"], w["frontend"]
    u_be, u_nm, u_fe = usage["backend"], usage["names"], usage["frontend"]
    lim_be, lim_nm, lim_fe = limits["backend"], limits["names"], limits["frontend"]
    bepack, namepack = L.BE_VAL.pack, L.NAME_VAL.pack
    fevpack, u32, namekey = L.FE_VAL.pack, L.U32.pack, L.NAME_KEY.pack
    kept, loaded = m.kept, m.be_loaded
    take = be_alloc.take
    bk, bv, nk, nv = bw.keys.extend, bw.vals.extend, nw.keys.extend, nw.vals.extend
    fk, fv = fw.keys.extend, fw.vals.extend
    if not be_id and not m.fe_owner and not loaded:  # a first sync: every backend is new
        u_be, u_nm, u_fe = _new_backends(be_order, pb, be_alloc, rejected, (u_be, u_nm, u_fe), limits,
                                         bw, nw, fw, pass_claims, new_backs, bulk_src)
        override = new_backs  # every backend's id is new: the same uid -> id (not changed after)
    else:
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
                rejected[f"backend/{uid}"] = bad_backend(b)
                continue
            nbid = take() if bid is None else bid
            code = nbid
            flags = (L.BE_HAS_V4 if ip4 else 0) | (L.BE_HAS_V6 if ip6 else 0)
            value = bepack(ip4 or ZERO4, ip6 or ZERO16, flags, *be_tail(b))
            name = namepack(f"{uid}\0{b.name}\0{b.namespace}".encode()[:L.NAME_LEN - 1])
            keys = pod_tokens(b) if ip6 else [ip4] if ip4 and routable(ip4) else []
            fes = []
            for k in keys:
                pc = pass_claims.get(k)
                if pc is not None and pc != code:
                    continue
                o = fe_owner.get(k)
                if o is None or o == code or k in released:
                    fes.append(k)
            if cur_b is not None:
                cur_value = render_backend(cur_b)
                cur_name = encode_name(cur_b.uid, cur_b.name, cur_b.namespace)
                cur_fes = [k for k in pod_tokens(cur_b) if fe_owner.get(k) == code]
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
                rejected[f"backend/{uid}"] = f"{full} map full ({limits[full]} entries)"
                if new:
                    be_alloc.release(nbid)
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
                    fk(token_key(k))
                    fv(fevpack(L.FE_BACKEND, nbid))
            if cur_fes:
                p1["frontend"].extend(token_key(k) for k in cur_fes if k not in fes)
    usage["backend"], usage["names"], usage["frontend"] = u_be, u_nm, u_fe
    bw.n = len(bw.keys) // 4
    nw.n = len(nw.keys) // L.NAME_KEY.size
    fw.n = len(fw.keys) // L.FE_KEY.size
    # a bulk first sync's backend names, packed a chunk at a time below
    names = _backend_names(bulk_src, be_alloc.ranges[-1].start) if bulk_src else None
    early: list[tuple[str, Writes]] = []
    fresh = not m.ports and not any(m.orphans.values())  # with no backends before: a first sync
    stream = None
    if on_early is not None and bw.n + nw.n + len(bulk_src) >= early_min:
        # A big batch (a first sync): let the kernel insert the backends and their names on a
        # second core while the services are rendered. Only ids nothing references yet or
        # in-place value changes, so writing them before phase 1 is as safe as in phase 2. With
        # a mirror that held nothing, the pod-IP frontends (new keys naming those backends) go
        # too, and the services' new slots and headers follow in chunks while they are planned:
        # nothing reaches a new service port before its VIP frontends, which stay in the plan.
        first = [("backend", bw), ("names", nw)]
        if fresh and not be_id:
            first.append(("frontend", fw))
            w["frontend"] = Writes()
            stream = on_early
        early.extend(first)
        on_early(first)
        for chunk in names or ():  # each handed over as soon as it is packed
            early.append(("names", chunk))
            on_early([("names", chunk)])
        w["backend"], w["names"] = Writes(), Writes()
        nw, fw = w["names"], w["frontend"]
    elif names is not None:
        for chunk in names:
            nw.add(chunk.keys, chunk.vals, chunk.n)

    # --- services: kept and new ports
    new_src: dict[str, tuple[Service, tuple[int | None, ...] | None]] = {}
    ovget = override.get
    bidget = be_id.get
    no_ids = not be_id
    ew, sw = w["endpoint"], w["service"]
    ek, ev, epkey = ew.keys.extend, ew.vals.extend, L.EP_KEY.pack
    render = render_slots
    if len(_VALUES) > 4096:
        _VALUES.clear()
    intern = _VALUES.setdefault
    bulk_delta = None
    if no_ids and not m.ports and not m.src and not fe_owner:  # a first sync: try it in bulk
        bulk_delta = _bulk_services(wanted, override, usage, limits, svc_alloc, ew, sw, nw, fw, pass_claims,
                                    new_ports, new_src, be_order if bulk_src else None)
        if bulk_delta is not None and stream is not None and ew.n >= early_min:
            batch = [("endpoint", ew), ("service", sw), ("names", nw)]
            early.extend(batch)
            stream(batch)
            ew, sw, nw = Writes(), Writes(), Writes()
    for sname, (svc, want, same_input) in (wanted.items() if bulk_delta is None else ()):
        if not want or svc is None:
            continue
        if same_input and not override:
            continue  # same input, no backend changed id in this pass: nothing to write
        uids = [u for sp in svc.ports for u in sp.uids]  # the compact columns: no Endpoint objects
        if same_input and not any(u in override for u in uids):
            continue
        if no_ids:  # nothing had an id before this pass: only this pass's ids count
            live = list(map(ovget, uids))
        else:
            live = [bidget(u) if (r := ovget(u, _NO)) is _NO else r for u in uids]
        sig = tuple(live)
        old = src.get(sname)
        if old is not None and old[1] == sig and (old[0] is svc or old[0] == svc):
            continue
        bad = bad_service(svc)
        if bad:
            rejected[sname] = bad
            new_src[sname] = (svc, None)  # retried on every pass until it fits
            continue
        staged: list[tuple[str, Port, Port | None]] = []
        need = {"frontend": 0, "service": 0, "endpoint": 0, "names": 0}
        reason = ""
        dropped = [m.ports[n] for n in sorted(m.port_names(sname)) if n not in want]
        for cur in dropped:
            need["frontend"] -= len(cur.fes)
            need["service"] -= 1 if cur.value else 0
            need["endpoint"] -= cur.nslots()
        offsets = []
        off = 0
        for sp in svc.ports:
            offsets.append(off)
            off += len(sp.uids)
        for pname, i in sorted(want.items()):
            sp = svc.ports[i]
            cur = m.ports.get(pname)
            if cur is None:
                sid = svc_alloc.take()
            else:
                sid = cur.id
            base = offsets[i]
            # rows: (backend_uid, target_port, weight, priority), read from the port's columns
            eps = [(*r, bid) for r, bid in zip(sp.rows(), live[base:base + len(sp.uids)], strict=True)
                   if bid is not None and 0 < r[1] < 65536]
            value, vals = render(svc.lb_mode, eps)
            if svc.waypoint is not None:
                value = value[:SVC_HEAD] + render_wp(svc.waypoint)
            value = intern(value, value)
            code = -sid
            fes = tuple(sorted({fe_key(vip, sp.port) for vip in svc.vips}))
            for k in fes:
                if not claimable(k, code):
                    other = claim_names.get(k) or owner_name(k)
                    reason = f"frontend {fmt_fe(k)} already belongs to {other}"
                    break
            if reason:
                break
            old_vals = cur.vals if cur is not None else EMPTY_VALS
            need["service"] += 0 if cur is not None and cur.value else 1
            need["names"] += 0 if cur is not None else 1
            need["endpoint"] += (sum(map(len, vals)) if cur is None else sum(
                max(0, len(n) - len(o)) for n, o in zip(vals, old_vals, strict=True))) // 8
            need["frontend"] += sum(1 for k in fes if cur is None or k not in cur.fes)
            staged.append((pname, Port(sid, pname, sname, value, vals, fes), cur))
        if not reason:
            full = [k for k, n in need.items() if usage[k] + n > limits[k]]
            if full:
                f = full[0]
                reason = f"{f} map full: needs {need[f]} more, {limits[f] - usage[f]} of {limits[f]} free"
        if reason:
            rejected[sname] = reason
            new_src[sname] = (svc, None)
            for _pname, p, cur in staged:
                if cur is None:
                    svc_alloc.release(p.id)
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
        for k, n in need.items():
            usage[k] += n
        for pname, p, cur in staged:
            new_ports[pname] = p
            sid = p.id
            for k in p.fes:
                pass_claims[k] = -sid
                claim_names[k] = pname
            if cur is None:  # a new port: its non-empty priorities (nearly always just 0)
                runs = [(prio, nv, b"") for prio, nv in enumerate(p.vals) if nv]
            else:
                runs = [(prio, nv, ov) for prio, (nv, ov) in enumerate(zip(p.vals, cur.vals, strict=True))
                        if nv != ov]
            for prio, nv, ov in runs:
                n_new, n_old = len(nv) // 8, len(ov) // 8
                if not ov:
                    if n_new <= _EPK_RUN:  # keys (sid, prio, 0..n-1) from a template, sid filled in
                        keys = _EPK[prio][:3 * n_new]
                        keys[0::3] = array("I", (sid,)) * n_new
                        ew.keys += keys
                    else:
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
        if stream is not None and ew.n >= early_min:
            batch = [("endpoint", ew), ("service", sw), ("names", nw)]
            early.extend(batch)
            stream(batch)
            ew, sw, nw = Writes(), Writes(), Writes()
            ek, ev = ew.keys.extend, ew.vals.extend
    w["endpoint"], w["service"], w["names"] = ew, sw, nw

    # --- backend reference counts after this pass
    counted: Counter[int] = Counter()  # Counter.update/subtract count in C
    gone: Counter[int] = Counter()
    ports_get = m.ports.get
    for pname, p in (new_ports.items() if bulk_delta is None else ()):
        cur = ports_get(pname)
        if cur is not None:
            gone.update(slot_backend_ids(cur.vals))
        if p is not None:
            counted.update(slot_backend_ids(p.vals))
    if gone:
        counted.subtract(gone)
    refs_once = bulk_delta if isinstance(bulk_delta, range) else range(0)
    delta: dict[int, int] = counted if bulk_delta is None else {} if refs_once else bulk_delta

    # --- backend removals: only once nothing references them any more
    kept_now: list[str] = []
    for uid, bid in removed_backs:
        after = (m.be_refs[bid] if bid < len(m.be_refs) else 0) + delta.get(bid, 0)
        if after > 0:
            kept_now.append(uid)  # the facade logs it
            continue
        new_backs[uid] = None
        cur_b = m.backend_of(bid)
        code = bid
        if cur_b is not None:
            p1["frontend"].extend(token_key(k) for k in pod_tokens(cur_b) if fe_owner.get(k) == code)
        p3["backend"].append(L.U32.pack(bid))
        p3["names"].append(L.NAME_KEY.pack(L.NAME_BACKEND, bid))

    # A frontend key re-written in phase 2 needs no phase-1 delete (it switches atomically),
    # unless its current target disappears in phase 1 (a dropped service port, an orphan).
    if p1["frontend"]:
        ks = L.FE_KEY.size
        rewritten = {bytes(fw.keys[i:i + ks]) for i in range(0, len(fw.keys), ks)}
        dropped_ids = {m.ports[n].id for n, p in new_ports.items() if p is None and n in m.ports}

        def must_delete(k: bytes) -> bool:
            if k not in rewritten:
                return True
            owner = fe_owner.get(fe_token(k))
            return owner is None or (owner < 0 and -owner in dropped_ids)

        p1["frontend"] = list(dict.fromkeys(k for k in p1["frontend"] if must_delete(k)))

    return Plan(free=[(name, p1[name]) for name in ("frontend", "service", "endpoint") if p1[name]],
                early=early,
                write=[(name, w[name]) for name in ("backend", "names", "endpoint", "service", "frontend")
                       if w[name].n],
                trim=[(name, p3[name]) for name in ("endpoint", "backend", "names") if p3[name]],
                rejected=rejected, orphans=orphans, ports=new_ports, backs=new_backs, verified=verified,
                refs=delta, refs_once=refs_once, kept_back=kept_back, kept_now=kept_now, claims=pass_claims,
                wanted=wanted,
                src=new_src, svc_ids=svc_alloc.done(), be_ids=be_alloc.done(), bulk_src=bulk_src)
