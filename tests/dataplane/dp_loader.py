"""A stand-alone loader process (for the restart test): open the data plane over the pins,
sync a projection read from a JSON file, print "synced <seconds>", then wait to be killed."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daemon.dataplane import Dataplane  # noqa: E402
from daemon.dataplane.model import (  # noqa: E402
    Backend,
    Endpoint,
    LbMode,
    Projection,
    Service,
    ServicePort,
    Waypoint,
)


def load_projection(path: Path) -> Projection:
    raw = json.loads(path.read_text())
    ip = (lambda s: ipaddress.ip_address(s).packed if s else None)  # noqa: E731
    def wp(w: dict | None) -> Waypoint | None:
        return None if w is None else Waypoint(ip(w["address"]) or b"", w["port"], w["name"])

    backends = {b["uid"]: Backend(b["uid"], b["name"], b["namespace"], ip(b.get("ipv4")),
                                  ip(b.get("ipv6")), b.get("handoff_port", 0), wp(b.get("waypoint")))
                for b in raw["backends"]}
    services = {}
    for s in raw["services"]:
        ports = tuple(ServicePort(p["port"], tuple(Endpoint(**e) for e in p["endpoints"]))
                      for p in s["ports"])
        services[s["name"]] = Service(s["name"], tuple(ip(v) for v in s["vips"]), ports, LbMode(s["lb_mode"]),
                                      wp(s.get("waypoint")))
    return Projection(services, backends)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroup", required=True)
    ap.add_argument("--pin-dir", required=True)
    ap.add_argument("--projection", required=True)
    a = ap.parse_args()
    t0 = time.monotonic()
    dp = Dataplane.open(Path(a.cgroup), Path(a.pin_dir))
    res = dp.sync(load_projection(Path(a.projection)))
    print(f"synced {time.monotonic() - t0:.3f} written={res.written} deleted={res.deleted}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
