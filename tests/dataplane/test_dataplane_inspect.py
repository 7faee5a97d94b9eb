"""What operators see: bpftool views, raw/decoded map dumps, ring-buffer events."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from dp_topo import VIP4, ip4, uid

from daemon.cgroupmount import cgroup2_root
from daemon.dataplane import ConnEvent, netns_cookie, read_pins

pytestmark = pytest.mark.kernel

MAP_NAMES = ("frontend", "service", "endpoint", "backend", "manage", "sock", "names", "layout", "config",
             "conn_stats")


def bpftool(*args: str) -> list | dict:
    out = subprocess.run(["bpftool", *args, "-j"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip() or "[]")


def test_bpftool_shows_programs_on_test_cgroup_not_root(dp, topology) -> None:
    shown = bpftool("cgroup", "show", str(topology.cgroup))
    by_type = {p["attach_type"]: p for p in shown}
    ids = dp.prog_ids()
    assert by_type["cgroup_inet4_connect"]["id"] == ids["connect4"]
    assert by_type["cgroup_inet6_connect"]["id"] == ids["connect6"]
    assert by_type["cgroup_inet4_getpeername"]["id"] == ids["getpeername4"]
    assert by_type["cgroup_inet6_getpeername"]["id"] == ids["getpeername6"]
    assert by_type["cgroup_sock_ops"]["id"] == ids["sockops"]
    at_root = {p["id"] for p in bpftool("cgroup", "show", str(cgroup2_root()))}
    assert not at_root & set(ids.values())


def test_bpftool_shows_pinned_maps(dp) -> None:
    for name in MAP_NAMES:
        info = bpftool("map", "show", "pinned", str(dp.gen_dir / name))
        assert info["name"] == f"km_{name}", info
    fe = bpftool("map", "show", "pinned", str(dp.gen_dir / "frontend"))
    assert fe["type"] == "hash" and not fe["flags"] & 1  # preallocated (no BPF_F_NO_PREALLOC)
    assert bpftool("map", "show", "pinned", str(dp.gen_dir / "sock"))["type"] == "array"


def test_raw_maps_agree_with_bpftool(dp) -> None:
    raw = dp.raw_maps()
    assert set(raw) == set(MAP_NAMES)
    for name in ("frontend", "service", "endpoint", "backend", "manage", "names", "layout"):
        dumped = bpftool("map", "dump", "pinned", str(dp.gen_dir / name))
        theirs = sorted((bytes(int(b, 16) for b in e["key"]).hex(),
                         bytes(int(b, 16) for b in e["value"]).hex()) for e in dumped)
        assert raw[name] == theirs, name
    assert len(raw["endpoint"]) == 3 and len(raw["service"]) == 1


def test_read_back_decodes_names_from_pins_alone(dp, topology) -> None:
    rb = dp.read_back()
    assert rb == read_pins(dp.gen_dir)  # a fresh reader with no in-memory state agrees
    assert rb == read_pins(dp.pin_dir)
    svc = {(s["name"], s["port"]) for s in rb["services"]}
    assert ("default/web", 80) in svc
    fes = {(f["address"], f["port"]): f for f in rb["frontends"]}
    assert fes[(VIP4, 80)]["service"] == "default/web"
    assert fes[("fd00:96::10", 80)]["kind"] == "service"
    pod = fes[(ip4("s1"), 0)]
    assert (pod["kind"], pod["backend"], pod["family"]) == ("backend", uid("s1"), "ipv4")
    eps = [e for e in rb["endpoints"] if e["service"] == "default/web"]
    assert sorted(e["backend"] for e in eps) == [uid("s1"), uid("s2"), uid("s3")]
    assert {e["target_port"] for e in eps} == {8080}
    be = {b["uid"]: b for b in rb["backends"]}
    assert be[uid("s2")]["name"] == "s2" and be[uid("s2")]["ipv4"] == ip4("s2")
    assert {"netns_cookie": netns_cookie(topology.ns_path("c1"))} in rb["manage"]
    pressure = dp.map_pressure()
    assert pressure["endpoint"]["entries"] == 3 and pressure["service"]["entries"] == 1
    assert pressure["manage"]["entries"] >= 1


def test_connection_events(dp, topology) -> None:
    seen: list[ConnEvent] = []
    dp.poll_events(seen.append, timeout_ms=10)  # drain
    seen.clear()
    r = topology.client("c1", f"{VIP4}:80", n=3)
    assert r["ok"] == 3
    topology.client("c1", f"{ip4('s1')}:8080", n=1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        dp.poll_events(seen.append, timeout_ms=100)
        if sum(1 for e in seen if e.kind == "close") >= 4:
            break
    cookie = netns_cookie(topology.ns_path("c1"))
    translated = [e for e in seen if e.verdict == "translated"]
    socks = {e.sock_cookie for e in translated}
    assert len(socks) == 3, seen
    for sc in socks:
        evs = {e.kind: e for e in translated if e.sock_cookie == sc}
        assert set(evs) == {"connect", "established", "close"}, evs
        c, close = evs["connect"], evs["close"]
        assert (c.orig_ip, c.orig_port, c.backend_port, c.service) == (VIP4, 80, 8080, "default/web")
        assert c.backend_uid in {uid("s1"), uid("s2"), uid("s3")} and c.netns_cookie == cookie
        assert c.backend_ip == ip4(c.backend_uid.rsplit("/", 1)[1])
        # kernel counters (tcp bytes_acked / bytes_received) include the SYN and FIN sequence numbers
        assert 6 <= close.bytes_sent <= 6 + 2, close
        reply = len(f"{c.backend_uid.rsplit('/', 1)[1]} {ip4('c1')} 8080\n")
        assert reply <= close.bytes_received <= reply + 1 and close.srtt_us > 0, close
        assert close.duration_ns > 0
    direct = [e for e in seen if e.kind == "connect" and e.orig_ip == ip4("s1")]
    assert direct and direct[0].verdict == "passthrough" and direct[0].backend_uid == uid("s1")


def test_no_healthy_endpoint_event(dp, topology) -> None:
    from dp_topo import backends, ep, service

    from daemon.dataplane.model import LbMode, Projection

    strict = service("default/web", (VIP4,), [ep("s1", priority=1)], lb=LbMode.STRICT)
    assert not dp.sync(Projection({strict.name: strict}, backends())).rejected
    seen: list[ConnEvent] = []
    dp.poll_events(seen.append, timeout_ms=10)
    seen.clear()
    assert topology.client("c1", f"{VIP4}:80", timeout=1)["ok"] == 0
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not any(e.verdict == "no_healthy_endpoint" for e in seen):
        dp.poll_events(seen.append, timeout_ms=100)
    ev = next(e for e in seen if e.verdict == "no_healthy_endpoint")
    assert (ev.kind, ev.service, ev.backend_uid, ev.orig_ip, ev.backend_ip) == (
        "connect", "default/web", "", VIP4, VIP4)
