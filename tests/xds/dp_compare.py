"""Compare live BPF maps (Dataplane.read_back) with a Projection, both reduced to name tuples.

The expectation is computed slot by slot from the data plane's documented rules, restated here
independently of daemon.dataplane (so a change there is caught, not mirrored):

- only services with at least one VIP are written; a port number appears once (first wins);
- an endpoint needs a target port in 1..65535 and a backend present in the projection;
- RANDOM puts every endpoint at priority 0; STRICT keeps priority 0 only; FAILOVER keeps each
  endpoint at its priority (clamped to 0..MAX_PRIORITY);
- per priority, endpoints are ordered by (backend uid, target port) and an endpoint gets
  ``weight / gcd(weights)`` consecutive slots, scaled down to at most 16 per endpoint
  (``max(1, round(w * 16 / max))``) when the largest reduced weight exceeds 16;
- the service header counts the slots of each priority.
"""

from __future__ import annotations

import ipaddress
from functools import reduce
from math import gcd
from typing import Any

from daemon.dataplane.model import MAX_PRIORITY, LbMode, Projection

MAX_SLOTS = 16
PRIORITIES = MAX_PRIORITY + 1


def _ip(raw: bytes | None) -> str | None:
    return None if raw is None else str(ipaddress.ip_address(raw))


def slots_for(weights: list[int]) -> list[int]:
    ws = [max(1, w) for w in weights]
    if not ws:
        return []
    g = reduce(gcd, ws)
    ws = [w // g for w in ws]
    top = max(ws)
    if top > MAX_SLOTS:
        ws = [max(1, round(w * MAX_SLOTS / top)) for w in ws]
    return ws


def expected(p: Projection) -> dict[str, Any]:
    """What the maps must hold for projection ``p``: frontends, slot rows, headers, backends."""
    frontends = set()
    endpoints = set()  # (service, port, priority, slot, backend uid, target port)
    headers = set()  # (service, port, lb mode name, slot count per priority)
    for svc in p.services.values():
        if not svc.vips:
            continue
        seen_ports: set[int] = set()
        for sp in svc.ports:
            if sp.port in seen_ports:
                continue
            seen_ports.add(sp.port)
            for vip in svc.vips:
                frontends.add((_ip(vip), sp.port, svc.name))
            by_prio: dict[int, list[tuple[str, int, int]]] = {}
            for e in sp.endpoints:
                if not 0 < e.target_port < 65536 or e.backend_uid not in p.backends:
                    continue
                prio = min(max(e.priority, 0), MAX_PRIORITY)
                if svc.lb_mode == LbMode.RANDOM:
                    prio = 0
                elif svc.lb_mode == LbMode.STRICT and prio != 0:
                    continue
                by_prio.setdefault(prio, []).append((e.backend_uid, e.target_port, e.weight))
            counts = [0] * PRIORITIES
            for prio, eps in by_prio.items():
                eps.sort()
                n = 0
                for (uid, tport, _w), reps in zip(eps, slots_for([e[2] for e in eps]), strict=True):
                    for _ in range(reps):
                        endpoints.add((svc.name, sp.port, prio, n, uid, tport))
                        n += 1
                counts[prio] = n
            headers.add((svc.name, sp.port, LbMode(svc.lb_mode).name, tuple(counts)))
    backends = {(b.uid, _ip(b.ipv4), _ip(b.ipv6)) for b in p.backends.values()}
    return {"frontends": frontends, "endpoints": endpoints, "headers": headers, "backends": backends}


def actual(read_back: dict[str, Any]) -> dict[str, Any]:
    """The same reduction of ``Dataplane.read_back()``."""
    frontends = {(f["address"], f["port"], f["service"])
                 for f in read_back["frontends"] if f["kind"] == "service"}
    endpoints = {(e["service"], e["port"], e["priority"], e["slot"], e["backend"], e["target_port"])
                 for e in read_back["endpoints"]}
    headers = {(s["name"], s["port"], s["lb_mode"], tuple(s["endpoint_counts"][:PRIORITIES]))
               for s in read_back["services"]}
    backends = {(b["uid"], b["ipv4"], b["ipv6"]) for b in read_back["backends"]}
    return {"frontends": frontends, "endpoints": endpoints, "headers": headers, "backends": backends}


def endpoint_targets(reduced: dict[str, Any], service: str) -> dict[str, int]:
    """{backend uid: target port} of a service's slots in a reduction (either side)."""
    return {row[4]: row[5] for row in reduced["endpoints"] if row[0] == service}
