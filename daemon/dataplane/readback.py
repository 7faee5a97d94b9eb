"""Decode the live maps into names (for `kmeshctl dump bpf`), from a Dataplane or from bare pins."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path

from daemon.dataplane import layout as L
from daemon.dataplane.mapio import MapIO
from daemon.dataplane.model import LbMode
from daemon.dataplane.reconciler import MapLike, decode_name


def _ip(raw: bytes, family: int) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == L.AF_INET else ipaddress.IPv6Address(raw))


def _wp(raw: bytes, fe_names: dict[tuple[str, int], str]) -> dict | None:
    """A km_wp as shown: address, port, and the waypoint service its frontend names."""
    addr, port, fam, _ = L.WP.unpack(raw)
    if fam == 0:
        return None
    if fam == L.WP_UNRESOLVED:
        return {"address": None, "port": None, "service": "", "unresolved": True}
    ip, p = _ip(addr, fam), int.from_bytes(port, "big")
    return {"address": ip, "port": p, "service": fe_names.get((ip, p), "")}


def decode(maps: Mapping[str, MapLike]) -> dict:
    names = {L.NAME_KEY.unpack(k): decode_name(v) for k, v in maps["names"].dump()}

    def svc(sid: int) -> tuple[str, int | None]:
        n = names.get((L.NAME_SERVICE, sid))
        if not n or ":" not in n[0]:
            return "", None
        s, _, p = n[0].rpartition(":")
        return s, int(p) if p.isdigit() else None

    def be(bid: int) -> str:
        n = names.get((L.NAME_BACKEND, bid))
        return n[0] if n else ""

    frontends = []
    for k, v in maps["frontend"].dump():
        addr, port, fam, _ = L.FE_KEY.unpack(k)
        kind, oid = L.FE_VAL.unpack(v)
        row: dict = {"address": _ip(addr, fam), "port": int.from_bytes(port, "big"),
                     "family": "ipv4" if fam == L.AF_INET else "ipv6", "id": oid}
        if kind == L.FE_SERVICE:
            row.update(kind="service", service=svc(oid)[0], service_port=svc(oid)[1])
        else:
            row.update(kind="backend", backend=be(oid))
        frontends.append(row)
    fe_names = {(r["address"], r["port"]): r["service"] for r in frontends if r["kind"] == "service"}
    services = []
    for k, v in maps["service"].dump():
        sid = L.U32.unpack(k)[0]
        lb, *rest = L.SVC_VAL.unpack(v)
        name, port = svc(sid)
        services.append({"id": sid, "name": name, "port": port,
                         "lb_mode": LbMode(lb).name if lb in LbMode._value2member_map_ else str(lb),
                         "endpoint_counts": rest[:L.PRIOS], "waypoint": _wp(v[-L.WP.size:], fe_names)})
    endpoints = []
    for k, v in maps["endpoint"].dump():
        sid, prio, slot = L.EP_KEY.unpack(k)
        bid, tport, _ = L.EP_VAL.unpack(v)
        name, port = svc(sid)
        endpoints.append({"service": name, "port": port, "service_id": sid, "priority": prio, "slot": slot,
                          "backend_id": bid, "backend": be(bid), "target_port": int.from_bytes(tport, "big")})
    backends = []
    for k, v in maps["backend"].dump():
        bid = L.U32.unpack(k)[0]
        ip4, ip6, flags, *_, hport, hmode, _ = L.BE_VAL.unpack(v)
        n = names.get((L.NAME_BACKEND, bid), [""])
        backends.append({"id": bid, "uid": n[0], "name": n[1] if len(n) > 1 else "",
                         "namespace": n[2] if len(n) > 2 else "",
                         "ipv4": _ip(ip4, L.AF_INET) if flags & L.BE_HAS_V4 else None,
                         "ipv6": _ip(ip6, L.AF_INET6) if flags & L.BE_HAS_V6 else None,
                         "waypoint": _wp(v[24:24 + L.WP.size], fe_names),
                         "handoff": {"port": int.from_bytes(hport, "big"),
                                     "encoding": L.HO_NAMES.get(hmode, str(hmode))}})
    manage = [{"netns_cookie": L.U64.unpack(k)[0]} for k, _ in maps["manage"].dump()]
    for rows, key in ((frontends, lambda r: (r["family"], r["address"], r["port"])),
                      (services, lambda r: r["id"]),
                      (endpoints, lambda r: (r["service_id"], r["priority"], r["slot"])),
                      (backends, lambda r: r["id"]), (manage, lambda r: r["netns_cookie"])):
        rows.sort(key=key)
    return {"frontends": frontends, "services": services, "endpoints": endpoints, "backends": backends,
            "manage": manage}


def find_generation(pin_dir: Path) -> Path:
    """The map generation under pin_dir (pin_dir itself if it already is one).

    With several (a migration in progress), the most recently created one that has a layout
    version recorded wins: that is the one the next sync attaches."""
    pin_dir = Path(pin_dir)
    if (pin_dir / "frontend").exists():
        return pin_dir
    gens = sorted((d for d in pin_dir.iterdir() if d.is_dir() and (d / "layout").exists()),
                  key=lambda d: d.stat().st_mtime) if pin_dir.is_dir() else []
    if not gens:
        raise FileNotFoundError(f"no kmesh map generation under {pin_dir}")
    return gens[-1]


def read_pins(pin_dir: Path) -> dict:
    """decode() straight from pins (a pin_dir or one generation), without compiling anything."""
    gen_dir = find_generation(pin_dir)
    maps = {name: MapIO.open_pinned(name, str(gen_dir / name)) for name in
            ("frontend", "service", "endpoint", "backend", "manage", "names")}
    try:
        return decode(maps)
    finally:
        for m in maps.values():
            m.close()
