"""Pure value rendering: how the pieces of a Projection become km_* map keys and values.

No state and no I/O: the planner (plan.py), the mirror (mirror.py) and the read-back all use
these, so a key or value is rendered the same way wherever it is compared.

Endpoint weights: a service port's weights are divided by their gcd and an endpoint gets that
many slots, scaled down so no endpoint has more than MAX_SLOTS_PER_ENDPOINT (16); a uniform pick
of a slot in the kernel is then a weighted pick (exact when the reduced weights are <= 16).
Slots are ordered by (backend uid, target port), so the same input always gives the same slots.
"""

from __future__ import annotations

import socket
import struct
from array import array
from functools import reduce
from math import gcd

from daemon.dataplane import layout as L
from daemon.dataplane.model import MAX_PRIORITY, Backend, LbMode, Service, ServicePort, Waypoint

MAX_SLOTS_PER_ENDPOINT = 16
assert array("I").itemsize == 4  # u32 ids are read and written as native arrays
RECONCILED_MAPS = ("frontend", "service", "endpoint", "backend", "names")
V4MAPPED = b"\0" * 10 + b"\xff\xff"
EPV = struct.Struct("=IHH")  # km_ep_val with the port pre-swapped by htons: same bytes as L.EP_VAL
ZERO4 = bytes(4)
ZERO16 = bytes(16)
htons = socket.htons


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


def routable(ip: bytes) -> bool:
    """Loopback and unspecified addresses are never another pod: a hostNetwork workload reported
    at 127.0.0.1 must not turn every pod's own loopback traffic into "direct pod access"."""
    if len(ip) == 4:
        return ip[0] != 127 and ip != bytes(4)
    return ip not in _LOCAL6


def be_keys(b: Backend) -> list[bytes]:
    """Pod-IP frontend keys of a backend (distinct)."""
    keys = [fe_key(ip, 0) for ip in (b.ipv4, b.ipv6) if ip and routable(ip)]
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
    return L.WP.pack(ZERO16, b"\0\0", L.WP_UNRESOLVED, 0)


def decode_wp(raw: bytes) -> Waypoint | None:
    addr, port, fam, _ = L.WP.unpack(raw)
    if fam == 0:
        return None
    if fam == L.WP_UNRESOLVED:
        return Waypoint(b"", 0)
    return Waypoint(addr[:4] if fam == L.AF_INET else addr, int.from_bytes(port, "big"))


def render_backend(b: Backend) -> bytes:
    flags = (L.BE_HAS_V4 if b.ipv4 else 0) | (L.BE_HAS_V6 if b.ipv6 else 0)
    return L.BE_VAL.pack(b.ipv4 or ZERO4, b.ipv6 or ZERO16, flags, *be_tail(b))


def be_tail(b: Backend) -> tuple:
    """The waypoint part of a backend value: its own waypoint, and its hand-off as a waypoint pod
    (PROXY v2 on the application_tunnel port, else Kmesh TLV on 15019)."""
    hp = b.handoff_port
    w = b.waypoint
    if w is None and not hp:
        return BE_TAIL_PLAIN  # nearly every backend: no per-backend work
    wp = render_wp(w)
    if 0 < hp < 65536:
        return wp[:16], wp[16:18], wp[18], 0, hp.to_bytes(2, "big"), L.HO_PROXY, 0
    return wp[:16], wp[16:18], wp[18], 0, _TLV_PORT, L.HO_TLV, 0


_TLV_PORT = L.HANDOFF_TLV_PORT.to_bytes(2, "big")
BE_TAIL_PLAIN = (ZERO16, b"\0\0", 0, 0, _TLV_PORT, L.HO_TLV, 0)


def slot_backend_ids(vals: tuple[bytes, ...]) -> set[int]:
    """Backend ids referenced by a port's packed slot values (km_ep_val: u32 id, then 4 bytes)."""
    out: set[int] = set()
    for blob in vals:
        if blob:
            a = array("I")
            a.frombytes(blob)
            out.update(a[0::2])
    return out


EMPTY_VALS = (b"",) * L.PRIOS
SVC_VAL_PACK = L.SVC_VAL.pack
SVC_HEAD = L.SVC_VAL.size - L.WP.size  # km_service bytes before its km_wp


def port_name(service: str, port: int) -> str:
    return f"{service}:{port}"


def render_slots(lb: LbMode, endpoints: list[tuple[str, int, int, int, int]]
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
    pack = EPV.pack
    if lb == LbMode.RANDOM and all(e[2] == 1 for e in endpoints):  # the common case
        endpoints.sort()
        blob = b"".join([pack(e[4], htons(e[1]), 0) for e in endpoints])
        return random_header(len(endpoints)), (blob, *EMPTY_VALS[1:])
    counts = [0] * L.PRIOS
    vals = [b""] * L.PRIOS
    for prio, eps in groups.items():
        eps.sort()  # (uid, port, weight, prio, id): the same uid has the same id, prio only ties equals
        if all(e[2] == 1 for e in eps):
            blob = b"".join([pack(e[4], htons(e[1]), 0) for e in eps])
        else:
            blob = b"".join([pack(e[4], htons(e[1]), 0) * reps
                             for e, reps in zip(eps, slot_counts([e[2] for e in eps]), strict=True)])
        vals[prio] = blob
        counts[prio] = len(blob) // 8
    key = (int(lb), *counts)
    head = _HEADERS.get(key)
    if head is None:
        head = _header(key, L.SVC_VAL.pack(int(lb), *counts, 0, ZERO16, b"\0\0", 0, 0))
    return head, tuple(vals)


# Service headers (km_service without a waypoint) depend only on the mode and the counts: at
# 10k services most are equal, and the mirror keeps one per port (~100 bytes each); equal ones
# share one bytes object. Keyed by the endpoint count (RANDOM, weight 1) or (mode, *counts).
_HEADERS: dict[int | tuple[int, ...], bytes] = {}


def _header(key: int | tuple[int, ...], value: bytes) -> bytes:
    if len(_HEADERS) < 4096:  # bounded: a pathological variety of counts just stops sharing
        _HEADERS[key] = value
    return value


def random_header(n: int) -> bytes:
    """km_service header (no waypoint) of a RANDOM port with n weight-1 slots, shared per n."""
    head = _HEADERS.get(n)
    if head is None:
        head = _header(n, SVC_VAL_PACK(0, n, 0, 0, 0, 0, 0, 0, 0, ZERO16, b"\0\0", 0, 0))
    return head


def render_port(lb: LbMode, sp: ServicePort, bids: list[int | None] | tuple[int | None, ...]
                ) -> tuple[bytes, tuple[bytes, ...]]:
    """``render_slots`` of a service port read in its compact form: ``bids`` are the backend ids
    aligned with ``sp.uids`` (None: the backend has no id, the endpoint is left out), endpoints
    without a valid target port are left out. No Endpoint object is built."""
    u = sp.uniform
    if u is not None:
        tp, w, prio = u
        if not 0 < tp < 65536:
            return render_slots(lb, [])
        eps = [(uid, tp, w, prio, bid) for uid, bid in zip(sp.uids, bids, strict=True) if bid is not None]
    else:
        eps = [(uid, tp, w, prio, bid) for (uid, tp, w, prio), bid in zip(sp.rows(), bids, strict=True)
               if bid is not None and 0 < tp < 65536]
    return render_slots(lb, eps)


def bad_backend(b: Backend) -> str:
    if b.ipv4 is not None and len(b.ipv4) != 4:
        return f"ipv4 must be 4 bytes, got {len(b.ipv4)}"
    if b.ipv6 is not None and len(b.ipv6) != 16:
        return f"ipv6 must be 16 bytes, got {len(b.ipv6)}"
    return ""


def bad_service(svc: Service) -> str:
    for vip in svc.vips:
        if len(vip) not in (4, 16):
            return f"VIP must be 4 or 16 bytes, got {len(vip)}"
    for sp in svc.ports:
        if not 0 < sp.port < 65536:
            return f"service port {sp.port} out of range 1-65535"
    return ""


def fmt_fe(key: bytes) -> str:
    import ipaddress

    addr, port, fam, _ = L.FE_KEY.unpack(key)
    ip = ipaddress.IPv4Address(addr[:4]) if fam == L.AF_INET else ipaddress.IPv6Address(addr)
    p = int.from_bytes(port, "big")
    return f"{ip}:{p}" if fam == L.AF_INET else f"[{ip}]:{p}"
