"""The monitoring switch (km_config): off = no ring-buffer events and no sockops state callbacks,
while translation and getpeername work as before; on again = events resume. Connection metrics
are counted in km_conn_stats; events flow only while a consumer is present (trace_on). Real
programs, real TCP from the managed client netns."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dp_topo import VIP4, ip4

from daemon.dataplane import ConnEvent, netns_cookie
from daemon.dataplane.layout import LAYOUT_VERSION
from daemon.dataplane.mapio import MapIO

pytestmark = pytest.mark.kernel


@pytest.fixture()
def mdp(dp) -> Iterator:
    """The session data plane with monitoring switched back on (and the ring drained) after."""
    dp.poll_events(lambda _e: None, timeout_ms=10)
    try:
        yield dp
    finally:
        dp.set_monitoring(access_log=True, metrics=True)
        dp.set_trace(True)  # the session fixture's state


def _collect(dp, seconds: float, until=None) -> list[ConnEvent]:
    seen: list[ConnEvent] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        dp.poll_events(seen.append, timeout_ms=100)
        if until is not None and until(seen):
            break
    return seen


def _sock_keys(dp) -> set[int]:
    """Cookies of the sockets that have a km_sock record (the slots in use)."""
    from daemon.dataplane import socks

    m = MapIO.open_pinned("sock", str(dp.gen_dir / "sock"))
    try:
        return {cookie for cookie, _ in socks.live_records(m)}
    finally:
        m.close()


def test_switch_state_is_read_from_the_kernel_map(mdp) -> None:
    assert mdp.monitoring() == {"access_log": True, "metrics": True, "enabled": True}
    assert mdp.set_monitoring(access_log=False) == {"access_log": False, "metrics": True, "enabled": True}
    assert mdp.set_monitoring(metrics=False) == {"access_log": False, "metrics": False, "enabled": False}
    assert mdp.set_monitoring() == {"access_log": False, "metrics": False, "enabled": False}  # no change
    m = MapIO.open_pinned("config", str(mdp.gen_dir / "config"))  # what the programs read
    try:
        assert m.dump()[0][1][:4] == (3).to_bytes(4, "little")
    finally:
        m.close()
    assert mdp.set_monitoring(access_log=True, metrics=True)["enabled"]


def test_off_no_events_translation_and_getpeername_unaffected(mdp, topology) -> None:
    cookie = netns_cookie(topology.ns_path("c1"))
    mdp.set_monitoring(access_log=False, metrics=False)
    before = _sock_keys(mdp)
    r = topology.client("c1", f"{VIP4}:80", n=4)
    assert r["ok"] == 4 and r["peers"] == [f"{VIP4}:80"], r  # translated; getpeername says the VIP
    direct = topology.client("c1", f"{ip4('s1')}:8080", n=1)
    assert direct["ok"] == 1, direct
    seen = [e for e in _collect(mdp, 1.0) if e.netns_cookie == cookie]
    assert seen == [], seen
    # no state callback was asked for: closed sockets keep their record (LRU ages them out);
    # only the translated ones have one (getpeername needs it), the direct connection none
    assert len(_sock_keys(mdp) - before) == 4

    mdp.set_monitoring(access_log=True, metrics=True)
    r = topology.client("c1", f"{VIP4}:80", n=2)
    assert r["ok"] == 2, r
    seen = _collect(mdp, 5.0, until=lambda s: sum(e.kind == "close" for e in s) >= 2)
    kinds = [e.kind for e in seen if e.netns_cookie == cookie and e.orig_ip == VIP4]
    assert kinds.count("connect") == kinds.count("established") == kinds.count("close") == 2, seen


def _stats(dp, cookie: int) -> dict[tuple, tuple[int, int, int, int]]:
    return {k: v for k, v in dp.conn_stats() if k[0] == cookie}


def _delta(after: dict, before: dict) -> dict[tuple, tuple[int, ...]]:
    out = {}
    for k, v in after.items():
        d = tuple(a - b for a, b in zip(v, before.get(k, (0, 0, 0, 0)), strict=True))
        if any(d):
            out[k] = d
    return out


def _wait_delta(dp, cookie: int, before: dict, closed: int, seconds: float = 5.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        d = _delta(_stats(dp, cookie), before)
        if sum(v[1] for v in d.values()) >= closed or time.monotonic() > deadline:
            return d
        time.sleep(0.05)


def test_sub_switches(mdp, topology) -> None:
    """Access log off, metrics on: no events, the kernel counters move. Metrics off, access log
    on: every kind still flows (the trace shows them), the counters stand still."""
    cookie = netns_cookie(topology.ns_path("c1"))
    mdp.set_monitoring(access_log=False, metrics=True)
    before = _stats(mdp, cookie)
    assert topology.client("c1", f"{VIP4}:80", n=2)["ok"] == 2
    d = _wait_delta(mdp, cookie, before, closed=2)
    assert [e for e in _collect(mdp, 0.5) if e.netns_cookie == cookie] == []
    assert len({k[1] for k in d}) == 1, d  # one service; one key per backend the LB picked
    for key in d:
        assert key[3] == "translated" and key[1] > 0 and key[2] > 0 and key[4:] == ("", 0), key
    opened, closed, sent, received = (sum(v[i] for v in d.values()) for i in range(4))
    assert (opened, closed) == (2, 2) and sent > 0 and received > 0, d

    mdp.set_monitoring(access_log=True, metrics=False)
    before = _stats(mdp, cookie)
    assert topology.client("c1", f"{VIP4}:80", n=1)["ok"] == 1
    seen = _collect(mdp, 5.0, until=lambda s: any(e.kind == "close" for e in s))
    assert sorted({e.kind for e in seen if e.netns_cookie == cookie}) == ["close", "connect", "established"]
    assert _delta(_stats(mdp, cookie), before) == {}


def test_no_consumer_no_events_counters_still_move(mdp, topology) -> None:
    """The daemon's default: metrics on, nobody tracing. No ring-buffer event at all; the
    kernel counts opened/closed/bytes per (netns, service, backend, verdict), and a direct pod
    connection (no service) is keyed by its destination address. A consumer again = events."""
    cookie = netns_cookie(topology.ns_path("c1"))
    mdp.set_trace(False)
    assert not mdp.tracing()
    before = _stats(mdp, cookie)
    assert topology.client("c1", f"{VIP4}:80", n=3)["ok"] == 3
    assert topology.client("c1", f"{ip4('s1')}:8080", n=1)["ok"] == 1
    d = _wait_delta(mdp, cookie, before, closed=4)
    assert [e for e in _collect(mdp, 0.5) if e.netns_cookie == cookie] == []
    vip = [(k, v) for k, v in d.items() if k[1]]
    direct = [(k, v) for k, v in d.items() if not k[1]]
    assert len({k[1] for k, _ in vip}) == 1 and sum(v[0] for _, v in vip) == sum(v[1] for _, v in vip) == 3, d
    assert not mdp.service_name(vip[0][0][1]).startswith("#"), vip  # ids decode to names
    assert len(direct) == 1 and direct[0][0][4:] == (ip4("s1"), 8080) and direct[0][1][:2] == (1, 1), d

    mdp.set_trace(True)
    assert topology.client("c1", f"{VIP4}:80", n=1)["ok"] == 1
    seen = _collect(mdp, 5.0, until=lambda s: any(e.kind == "close" and e.netns_cookie == cookie for e in s))
    assert sorted({e.kind for e in seen if e.netns_cookie == cookie}) == ["close", "connect", "established"]


@pytest.mark.parametrize("older", ["v2", "same-layout"])
def test_upgrade_keeps_switch_enrolment_and_sockets(topology, pin_root, make_cgroup, older: str) -> None:
    """An older generation left by an older daemon: the new one carries over enrolment and the
    switch, and the km_sock records only from a generation whose km_sock means the same
    (layout >= SOCK_SAME_SINCE; slots re-indexed for the new size), never a layout-2 hash.
    Simulated by renaming our own generation."""
    from dp_topo import base_projection

    from daemon.dataplane import Dataplane, control_connect
    from daemon.dataplane.layout import SOCK_SAME_SINCE

    cg = make_cgroup(f"dp-mon-upgrade-{older}")
    pins = pin_root / f"mon-upgrade-{older}"
    old = Dataplane.open(cg, pins)
    new = None
    try:
        old.sync(base_projection())
        control_connect(topology.ns_path("c1"), True, cgroup=cg)
        old.set_monitoring(access_log=False, metrics=False)  # closed sockets keep their records
        assert topology.client("c1", f"{VIP4}:80", n=2, cgroup=cg)["ok"] == 2
        socks = _sock_keys(old)
        assert len(socks) >= 2
        old_gen = old.gen_dir
        old.close()
        version = "v2" if older == "v2" else f"v{SOCK_SAME_SINCE}"
        renamed = old_gen.with_name(f"{version}-00000000")
        old_gen.rename(renamed)
        new = Dataplane.open(cg, pins)
        assert new.gen_dir.name.startswith(f"v{LAYOUT_VERSION}-") and not new.attached
        assert new.monitoring() == {"access_log": False, "metrics": False, "enabled": False}
        if older == "v2":
            assert not _sock_keys(new)  # km_sock meant something else then
        else:
            assert socks <= _sock_keys(new)
        assert not new.sync(base_projection()).rejected and new.attached
        assert not renamed.exists()
        r = topology.client("c1", f"{VIP4}:80", n=2, cgroup=cg)  # enrolment carried over
        assert r["ok"] == 2 and r["peers"] == [f"{VIP4}:80"], r
    finally:
        (new or old).uninstall()
        if new is not None:
            old.close()


def _sockops_ids(cgroup) -> list[int]:
    """Program ids attached as sock_ops to the cgroup, as the kernel reports them."""
    import os

    from daemon.dataplane import bpfsys

    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpfsys.prog_query(fd, bpfsys.CGROUP_SOCK_OPS)
    finally:
        os.close(fd)


def test_sockops_attached_only_while_needed(mdp, topology) -> None:
    """sockops costs every connection even when it returns at once: it is detached while
    monitoring is off and no waypoint exists, attached again before a waypoint frontend is
    written or monitoring comes back; translation and getpeername never depend on it."""
    from dataclasses import replace

    from dp_topo import base_projection

    from daemon.dataplane.model import Waypoint

    ours = mdp.prog_ids()["sockops"]
    assert _sockops_ids(topology.cgroup) == [ours] and mdp.sockops_attached
    mdp.set_monitoring(access_log=False)
    assert _sockops_ids(topology.cgroup) == [ours]  # metrics still on
    mdp.set_monitoring(metrics=False)
    assert _sockops_ids(topology.cgroup) == [] and mdp.sockops_attached is False
    r = topology.client("c1", f"{VIP4}:80", n=2)
    assert r["ok"] == 2 and r["peers"] == [f"{VIP4}:80"], r

    base = base_projection()
    web = base.services["default/web"]
    with_wp = replace(base, services={web.name: replace(web, waypoint=Waypoint(b"", 15008, "default/wp"))})
    mdp.sync(with_wp)  # a waypoint service: the hand-off needs sockops, monitoring or not
    assert _sockops_ids(topology.cgroup) == [ours]
    mdp.update(base, [web.name], [])  # the last waypoint gone: detached again
    assert _sockops_ids(topology.cgroup) == []
    pod = next(iter(base.backends.values()))
    pod_wp = replace(pod, waypoint=Waypoint(b"", 15008))
    mdp.update(replace(base, backends={**base.backends, pod.uid: pod_wp}), [], [pod.uid])  # pod-level too
    assert _sockops_ids(topology.cgroup) == [ours]
    mdp.sync(base)
    assert _sockops_ids(topology.cgroup) == []

    mdp.set_monitoring(metrics=True)
    assert _sockops_ids(topology.cgroup) == [ours] and mdp.sockops_attached
    cookie = netns_cookie(topology.ns_path("c1"))
    before = _stats(mdp, cookie)
    r = topology.client("c1", f"{VIP4}:80", n=2)
    assert r["ok"] == 2, r
    assert sum(v[1] for v in _wait_delta(mdp, cookie, before, closed=2).values()) >= 2  # counted again
