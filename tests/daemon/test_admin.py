"""Admin API: endpoints, loggers at runtime, trace streaming, and loopback-only binding."""

from __future__ import annotations

import http.client
import json
import os
import queue
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from daemon import logging_setup
from daemon.admin import AdminContext, AdminServer
from daemon.enroll import EnrolledPod
from daemon.events import EventHub, NameResolver
from tests.daemon.netns import Netns, link

REPO = Path(__file__).resolve().parents[2]


class Xds:
    def __init__(self) -> None:
        self.connected = True

    def status(self) -> dict:
        return {"address": "127.0.0.1:15010", "cluster_id": "c1", "connected": self.connected,
                "ready": self.connected, "last_error": "" if self.connected else "connection refused",
                "acks": 3, "nacks": 0, "resources": {"Address": 4}, "history": [], "reconnects": 0}


class Dataplane:
    """Event source + map views with the Dataplane method names."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.ratio = 0.1

    def poll_events(self, callback, timeout_ms: int = 100) -> None:
        try:
            callback(self.events.get(timeout=timeout_ms / 1000))
        except queue.Empty:
            pass

    def map_pressure(self) -> dict:
        return {"frontend": {"entries": 1, "max": 10, "ratio": self.ratio}}

    def read_back(self) -> dict:
        return {"frontends": [], "services": [], "endpoints": [], "backends": [], "manage": []}

    def raw_maps(self) -> dict:
        return {"frontend": [("0a 00", "01 00")]}


class Enroll:
    pod = EnrolledPod(uid="u", namespace="default", name="netutils", ips=("10.0.0.3",), pid=1, netns="/x",
                      netns_inode=1, netns_cookie=77, since=0)

    def find(self, ns: str, name: str):
        return self.pod if (ns, name) == ("default", "netutils") else None

    def by_cookie(self, cookie: int):
        return self.pod if cookie == 77 else None

    def enrolled(self):
        return [self.pod]

    def status(self) -> dict:
        return {"converged": True, "pods": [self.pod.as_dict()], "namespaces": ["default"], "errors": {}}


@pytest.fixture()
def admin():
    dp, xds, enroll = Dataplane(), Xds(), Enroll()
    hub = EventHub(dp)
    ctx = AdminContext(dataplane=dp, xds=xds, enroll=enroll, hub=hub, resolver=NameResolver(None, enroll),
                       started=time.time())
    server = AdminServer("127.0.0.1", 0, ctx)
    server.start()
    hub.start()
    logging_setup.setup_logging({})
    yield server, dp, xds
    hub.stop()
    server.stop()


def get(server: AdminServer, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_endpoints(admin) -> None:
    server, dp, xds = admin
    code, body = get(server, "/version")
    assert code == 200 and json.loads(body)["gitVersion"].startswith("v")
    code, body = get(server, "/debug/ready")
    assert (code, body) == (200, b"OK\n")
    status = json.loads(get(server, "/status")[1])
    assert status["ready"] and status["xds"]["acks"] == 3
    assert status["enrollment"]["pods"][0]["name"] == "netutils"
    assert status["maps"]["frontend"]["ratio"] == 0.1
    bpf = json.loads(get(server, "/debug/bpf")[1])
    assert bpf["raw"]["frontend"] == [["0a 00", "01 00"]] and bpf["enrolled"][0]["netns_cookie"] == 77
    assert get(server, "/debug/config_dump")[0] == 503  # no state yet: says so
    assert get(server, "/nope")[0] == 404
    mem = json.loads(get(server, "/debug/memory?top=5")[1])
    assert mem["process_mib"]["VmRSS"] > 0 and mem["gc_objects"] > 1000
    top = mem["gc_objects_by_type"]
    assert len(top) == 5 and {"type", "count", "mib"} <= set(top[0])
    assert "PYTHONTRACEMALLOC" in mem["top_sites"]  # not tracing: says how to
    xds.connected = False
    code, body = get(server, "/debug/ready")
    assert code == 503 and b"connection refused" in body
    xds.connected = True
    dp.ratio = 0.95
    assert b"95% full" in get(server, "/debug/ready")[1]


def test_loggers_get_and_post(admin) -> None:
    server, _, _ = admin
    port = server.server_address[1]
    loggers = json.loads(get(server, "/debug/loggers")[1])
    assert {"name": "xds", "level": "info"} in loggers
    req = urllib.request.Request(f"http://127.0.0.1:{port}/debug/loggers", method="POST",
                                 data=json.dumps({"name": "xds", "level": "debug"}).encode())
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.loads(resp.read()) == {"name": "xds", "level": "debug"}
    assert json.loads(get(server, "/debug/loggers?name=xds")[1]) == {"name": "xds", "level": "debug"}
    bad = urllib.request.Request(f"http://127.0.0.1:{port}/debug/loggers", method="POST",
                                 data=json.dumps({"name": "xds", "level": "loud"}).encode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=5)
    assert err.value.code == 400


def test_trace_stream_filters_by_pod(admin) -> None:
    server, dp, _ = admin
    code, body = get(server, "/debug/trace?pod=default/other")
    assert code == 404 and b"not enrolled" in body
    assert get(server, "/debug/trace?pod=bad")[0] == 400
    assert get(server, "/debug/trace?pod=default/netutils&count=x")[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.request("GET", "/debug/trace?pod=default/netutils&count=2&timeout=5")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    base = {"ts_ns": time.monotonic_ns(), "verdict": "translated", "sock_cookie": 1, "orig_ip": "10.96.0.1",
            "orig_port": 80, "backend_ip": "10.0.0.9", "backend_port": 8080, "service": "default/s.svc",
            "backend_uid": "", "bytes_sent": 0, "bytes_received": 0, "srtt_us": 0, "duration_ns": 0}
    dp.events.put(dict(base, kind="connect", netns_cookie=99))  # another pod: filtered out
    dp.events.put(dict(base, kind="connect", netns_cookie=77))
    dp.events.put(dict(base, kind="close", netns_cookie=77, bytes_sent=5, srtt_us=9))
    lines = [json.loads(x) for x in resp.read().decode().splitlines() if x.strip()]
    assert [x["kind"] for x in lines] == ["connect", "close"]
    assert lines[0]["source"] == {"namespace": "default", "pod": "netutils", "netns_cookie": 77}
    assert lines[0]["original"] == {"ip": "10.96.0.1", "port": 80, "service": "default/s.svc"}
    assert lines[1]["bytes_sent"] == 5 and lines[1]["srtt_us"] == 9


def test_constructor_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="not loopback"):
        AdminServer("0.0.0.0", 0, AdminContext())


SERVE = textwrap.dedent("""
    import socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from daemon.admin import AdminContext, AdminServer
    AdminServer("127.0.0.1", 15200, AdminContext()).start()
    other = socket.create_server(("0.0.0.0", 15201))
    print("ready", flush=True)
    while True:
        c, _ = other.accept(); c.close()
""")
PROBE = textwrap.dedent("""
    import socket, sys
    for port in (15200, 15201):
        try:
            socket.create_connection((sys.argv[1], port), timeout=3).close(); print(port, "open")
        except OSError as e:
            print(port, "closed", type(e).__name__)
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_admin_not_reachable_from_another_netns(run_prefix: str) -> None:
    """The admin port answers on 127.0.0.1 in its netns and on no other address of it, while a
    wildcard listener in the same netns is reachable from the peer (so the path works)."""
    a, b = Netns(f"{run_prefix}-adma"), Netns(f"{run_prefix}-admb")
    proc = None
    try:
        a.create(), b.create()
        link(a, b, "adm0", "adm1", "10.250.0.1", "10.250.0.2")
        proc = a.popen(sys.executable, "-c", SERVE, str(REPO), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        out = b.exec(sys.executable, "-c", PROBE, "10.250.0.1").stdout
        assert "15201 open" in out, out
        assert "15200 closed ConnectionRefusedError" in out, out
        assert "15200 open" in a.exec(sys.executable, "-c", PROBE, "127.0.0.1").stdout
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        a.delete()
        b.delete()


def test_config_dump_sections_gzip_and_cache_invalidation() -> None:
    import gzip

    from daemon.xds.dump import wl
    from daemon.xds.resources import ADDRESS_TYPE, decode_address
    from tests.daemon.bench_dump import build_state

    state = build_state(50)
    server = AdminServer("127.0.0.1", 0, AdminContext(state=state))
    server.start()
    try:
        full = json.loads(get(server, "/debug/config_dump")[1])
        assert full == json.loads(json.dumps(state.config_dump()))
        only = json.loads(get(server, "/debug/config_dump?types=workloads")[1])
        assert list(only) == ["workloads"] and only["workloads"] == full["workloads"]
        both = json.loads(get(server, "/debug/config_dump?types=services,policies")[1])
        assert both == {"services": full["services"], "policies": full["policies"]}
        code, body = get(server, "/debug/config_dump?types=bogus")
        assert code == 400 and b"unknown config_dump types" in body
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/debug/config_dump?types=workloads", headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        assert resp.getheader("Content-Encoding") == "gzip"
        assert json.loads(gzip.decompress(resp.read())) == only
        # A state change is visible at once (the cached body is dropped).
        w = wl.Workload(uid="Kubernetes//Pod/zz/new-pod", name="new-pod", namespace="zz",
                        cluster_id="Kubernetes")
        w.addresses.append(bytes([10, 9, 9, 9]))
        raw = wl.Address(workload=w).SerializeToString()
        state.apply_addresses([decode_address(w.uid, ADDRESS_TYPE, raw)])
        again = json.loads(get(server, "/debug/config_dump?types=workloads")[1])
        assert len(again["workloads"]) == 51 and again["workloads"][-1]["name"] == "new-pod"
    finally:
        server.stop()


def test_parse_monitoring_queries() -> None:
    """Kmesh's shapes (/monitoring, /accesslog, /connection_metrics ?enable=) and the sub-switches."""
    from daemon.admin import parse_monitoring

    assert parse_monitoring("/monitoring", {"enable": ["false"]}) == {"access_log": False, "metrics": False}
    assert parse_monitoring("/accesslog", {"enable": ["true"]}) == {"access_log": True, "metrics": None}
    assert parse_monitoring("/connection_metrics", {"enable": ["False"]}) == {"access_log": None,
                                                                              "metrics": False}
    assert parse_monitoring("/monitoring", {"accesslog": ["true"], "connectionMetrics": ["false"]}) == {
        "access_log": True, "metrics": False}
    for path, query in (("/monitoring", {}), ("/monitoring", {"enable": ["1"]}),
                        ("/accesslog", {"accesslog": ["true"]}), ("/monitoring", {"bogus": ["true"]}),
                        ("/monitoring", {"enable": ["true"], "metrics": ["false"]})):
        with pytest.raises(ValueError):
            parse_monitoring(path, query)
