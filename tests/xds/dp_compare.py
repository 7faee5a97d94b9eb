"""Compare live BPF maps (Dataplane.read_back) with a Projection, both reduced to name tuples."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

from daemon.dataplane.model import Projection


def _ip(raw: bytes | None) -> str | None:
    return None if raw is None else str(ipaddress.ip_address(raw))


def expected(p: Projection) -> dict[str, Any]:
    """What the maps must hold for projection ``p``."""
    frontends = set()
    endpoints: Counter = Counter()
    for svc in p.services.values():
        for sp in svc.ports:
            for vip in svc.vips:
                frontends.add((_ip(vip), sp.port, svc.name))
            for e in sp.endpoints:
                endpoints[(svc.name, sp.port, e.priority, e.backend_uid, e.target_port)] += 1
    backends = {(b.uid, _ip(b.ipv4), _ip(b.ipv6)) for b in p.backends.values()}
    return {"frontends": frontends, "endpoints": endpoints, "backends": backends}


def actual(read_back: dict[str, Any]) -> dict[str, Any]:
    """The same reduction of ``Dataplane.read_back()``."""
    frontends = {(f["address"], f["port"], f["service"])
                 for f in read_back["frontends"] if f["kind"] == "service"}
    endpoints: Counter = Counter((e["service"], e["port"], e["priority"], e["backend"], e["target_port"])
                                 for e in read_back["endpoints"])
    backends = {(b["uid"], b["ipv4"], b["ipv6"]) for b in read_back["backends"]}
    return {"frontends": frontends, "endpoints": endpoints, "backends": backends}
