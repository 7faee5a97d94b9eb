"""Restart and migration: SIGKILL the loader under load; capacity rejection; layout migration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from dp_topo import HERE, PY, VIP4, backends, base_projection, ep, projection_json, service

from daemon.dataplane import Capacity, Dataplane, bpfsys, control_connect, generation_name, uninstall
from daemon.dataplane import layout as L
from daemon.dataplane.mapio import MapIO
from daemon.dataplane.model import Projection
from daemon.dataplane.reconciler import fe_key

pytestmark = pytest.mark.kernel


def _start_loader(cgroup: Path, pins: Path, proj_file: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([PY, str(HERE / "dp_loader.py"), "--cgroup", str(cgroup), "--pin-dir", str(pins),
                             "--projection", str(proj_file)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("synced"), line
    return proc, line


TYPES = (bpfsys.CGROUP_INET4_CONNECT, bpfsys.CGROUP_INET6_CONNECT, bpfsys.CGROUP_INET4_GETPEERNAME,
         bpfsys.CGROUP_INET6_GETPEERNAME, bpfsys.CGROUP_SOCK_OPS)


def _attached(cgroup: Path) -> dict[int, list[int]]:
    fd = os.open(cgroup, os.O_RDONLY)
    try:
        return {t: bpfsys.prog_query(fd, t) for t in TYPES}
    finally:
        os.close(fd)


def test_sigkill_loader_under_load_zero_failures(topology, pin_root, make_cgroup, tmp_path) -> None:
    cg = make_cgroup("dp-restart")
    pins = pin_root / "restart"
    proj_file = tmp_path / "projection.json"
    proj_file.write_text(projection_json(base_projection()))
    procs: list[subprocess.Popen] = []
    try:
        a, _ = _start_loader(cg, pins, proj_file)
        procs.append(a)
        control_connect(topology.ns_path("c1"), True, cgroup=cg)
        before = _attached(cg)
        assert all(len(ids) == 1 for ids in before.values()), before
        # drift a new process must repair: a stale frontend and a slot beyond a service's count
        gen = pins / generation_name(Capacity())
        fe = MapIO.open_pinned("frontend", str(gen / "frontend"))
        epm = MapIO.open_pinned("endpoint", str(gen / "endpoint"))
        fe.update(fe_key(bytes([10, 96, 0, 99]), 80), L.FE_VAL.pack(L.FE_SERVICE, 4242))
        epm.update(L.EP_KEY.pack(1, 0, 50), L.EP_VAL.pack(1, (8080).to_bytes(2, "big"), 0))

        client = subprocess.Popen(topology.client_cmd("c1", f"{VIP4}:80", n=300, rate=50, cgroup=cg),
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert client.poll() is None
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        b, line = _start_loader(cg, pins, proj_file)
        procs.append(b)
        assert client.poll() is None, "the new loader must take over while the client is running"
        out, _ = client.communicate(timeout=60)
        r = json.loads(out)
        assert r["fail"] == 0 and r["ok"] == 300, r
        assert set(r["counts"]) == {"s1", "s2", "s3"}, r
        after = _attached(cg)
        assert all(len(ids) == 1 for ids in after.values()), after
        assert all(after[t] != before[t] for t in after), (before, after)  # replaced, not stacked
        # the new loader's first sync removed exactly the drift and rewrote nothing else
        assert "written=0" in line and "deleted=2" in line, line
        assert fe.lookup(fe_key(bytes([10, 96, 0, 99]), 80)) is None
        assert epm.lookup(L.EP_KEY.pack(1, 0, 50)) is None
        fe.close()
        epm.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        uninstall(cg, pins)  # no compile: programs matched by name, pins removed
    assert all(not ids for ids in _attached(cg).values())
    assert not pins.exists()


def test_capacity_rejection_then_migration(topology, pin_root, make_cgroup) -> None:
    cg = make_cgroup("dp-cap")
    pins = pin_root / "cap"
    small = Capacity(frontends=64, services=4, endpoints=8, backends=16, manage=2, sockets=64)
    a = service("default/a", ("10.96.1.1",), [ep("s1"), ep("s2"), ep("s3")])
    b = service("default/b", ("10.96.1.2",), [ep("s1"), ep("s2"), ep("s3")])
    big = service("default/big", ("10.96.1.3",), [ep("s1"), ep("s2"), ep("s3")])
    c = service("default/c", ("10.96.1.4",), [ep("s2")])
    proj = Projection({s.name: s for s in (a, b, big, c)}, backends())
    dp = Dataplane.open(cg, pins, small)
    dp2 = None
    try:
        res = dp.sync(proj)
        assert list(res.rejected) == ["default/big"], res
        assert "endpoint map full" in res.rejected["default/big"], res
        rb = dp.read_back()
        assert "default/big" not in {s["name"] for s in rb["services"]}
        assert "10.96.1.3" not in {f["address"] for f in rb["frontends"]}
        control_connect(topology.ns_path("c1"), True, cgroup=cg)
        control_connect(topology.ns_path("s1"), True, cgroup=cg)
        # manage map full: the control connect is refused locally (nothing leaves) and reported
        with pytest.raises(RuntimeError, match="ECONNREFUSED"):
            control_connect(topology.ns_path("s2"), True, cgroup=cg)
        control_connect(topology.ns_path("s1"), False, cgroup=cg)
        for vip in ("10.96.1.1", "10.96.1.2", "10.96.1.4"):
            assert topology.client("c1", f"{vip}:80", n=5, cgroup=cg)["ok"] == 5, vip
        assert topology.client("c1", "10.96.1.3:80", timeout=1, cgroup=cg)["ok"] == 0
        pressure = dp.map_pressure()
        assert pressure["endpoint"] == {"entries": 7, "max": 8, "ratio": 0.875}
        assert pressure["manage"] == {"entries": 1, "max": 2, "ratio": 0.5}

        dp.set_monitoring(access_log=False)  # the switch is pinned: it must survive the migration

        # more capacity = a new map generation: old programs keep serving until the first sync
        dp2 = Dataplane.open(cg, pins, Capacity())
        assert not dp2.attached and (pins / generation_name(small)).exists()
        assert dp2.monitoring() == {"access_log": False, "metrics": True, "enabled": True}
        assert topology.client("c1", "10.96.1.1:80", n=3, cgroup=cg)["ok"] == 3
        # enrolled through the old programs while the new generation waits: must not be lost
        control_connect(topology.ns_path("c2"), True, cgroup=cg)
        res = dp2.sync(proj)
        assert not res.rejected and dp2.attached
        assert sorted(p.name for p in pins.iterdir()) == [generation_name(Capacity())]
        # enrolment was carried over: c1 is translated without a new control connect
        r = topology.client("c1", "10.96.1.3:80", n=5, cgroup=cg)
        assert r["ok"] == 5 and r["peers"] == ["10.96.1.3:80"], r
        assert topology.client("c2", "10.96.1.3:80", n=2, cgroup=cg)["ok"] == 2
        dp.close()
    finally:
        (dp2 or dp).uninstall()
        if dp2 is not None:
            dp.close()
    # teardown leaves nothing: no programs on the cgroup, no pins
    assert all(not ids for ids in _attached(cg).values())
    assert not pins.exists()
