"""Prometheus exposition text: counters from connection events with Istio labels, gauges."""

from __future__ import annotations

import re
import urllib.request

from daemon.enroll import EnrolledPod
from daemon.events import EventHub
from daemon.metrics import ConnectionMetrics, MetricsServer, MetricsSource

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def check_exposition(text: str) -> dict[str, list[tuple[str, float]]]:
    """Parse the text format strictly enough to catch malformed output."""
    families: dict[str, list[tuple[str, float]]] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            assert name not in typed, f"duplicate TYPE {name}"
            typed.add(name)
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        assert m.group(1) in typed, f"sample before TYPE: {line}"
        families.setdefault(m.group(1), []).append((m.group(2) or "", float(m.group(4))))
    return families


class Resolver:
    """The NameResolver interface over a fixed table."""

    workloads = {"Kubernetes//Pod/default/fortio-v1-abc": {
        "uid": "Kubernetes//Pod/default/fortio-v1-abc", "name": "fortio-v1-abc", "namespace": "default",
        "workloadName": "fortio-v1", "canonicalName": "fortio", "canonicalRevision": "v1",
        "serviceAccount": "default", "trustDomain": "cluster.local", "clusterId": "c1"}}

    def workload_uid(self, ip: str = "", namespace: str = "", name: str = "") -> str:
        return ""

    def workload(self, uid: str) -> dict:
        return self.workloads.get(uid, {})

    def service_for_vip(self, ip: str) -> str:
        return "default/fortio.default.svc.cluster.local" if ip == "10.96.0.10" else ""


class Enroll:
    pod = EnrolledPod(uid="u", namespace="default", name="netutils", ips=("10.244.0.3",), pid=1, netns="/x",
                      netns_inode=1, netns_cookie=4242, since=0)

    def by_cookie(self, cookie: int) -> EnrolledPod | None:
        return self.pod if cookie == 4242 else None


def event(kind: str, **kw) -> dict:
    base = {"ts_ns": 1, "kind": kind, "verdict": "translated", "netns_cookie": 4242, "sock_cookie": 7,
            "orig_ip": "10.96.0.10", "orig_port": 80, "backend_ip": "10.244.0.7", "backend_port": 8080,
            "service": "", "backend_uid": "Kubernetes//Pod/default/fortio-v1-abc", "bytes_sent": 0,
            "bytes_received": 0, "srtt_us": 0, "duration_ns": 0}
    base.update(kw)
    return base


def test_connection_counters_with_istio_labels() -> None:
    conn = ConnectionMetrics(Resolver(), Enroll())
    hub = EventHub(dataplane=None)
    hub.add_sink(conn.on_event)
    for _ in range(3):
        hub.dispatch(event("connect"))
        hub.dispatch(event("established"))
        hub.dispatch(event("close", bytes_sent=100, bytes_received=1000, duration_ns=5_000_000))
    text = MetricsSource(conn, pressure=lambda: {"frontend": {"entries": 5, "max": 10, "ratio": 0.5}},
                         xds_status=lambda: {"address": "x:1", "cluster_id": "c1", "connected": True,
                                             "acks": 4, "nacks": 1, "reconnects": 2,
                                             "resources": {"type.googleapis.com/istio.workload.Address": 9}}
                         ).render()
    fams = check_exposition(text)
    (labels, opened), = fams["kmesh_tcp_connections_opened_total"]
    assert opened == 3 and fams["kmesh_tcp_connections_closed_total"][0][1] == 3
    assert fams["kmesh_tcp_sent_bytes_total"][0][1] == 300
    assert fams["kmesh_tcp_received_bytes_total"][0][1] == 3000
    for want in ('reporter="source"', 'source_workload="netutils"', 'source_workload_namespace="default"',
                 'destination_service="fortio.default.svc.cluster.local"',
                 'destination_service_namespace="default"', 'destination_service_name="fortio"',
                 'destination_workload="fortio-v1"', 'destination_workload_namespace="default"',
                 'destination_canonical_revision="v1"',
                 'destination_principal="spiffe://cluster.local/ns/default/sa/default"'):
        assert want in labels, want
    assert fams["kmesh_bpf_map_pressure"] == [('{map="frontend"}', 0.5)]
    assert fams["kmesh_map_entries"] == [('{map="frontend"}', 5.0)]
    assert fams["kmesh_xds_connected"][0][1] == 1 and fams["kmesh_xds_nacks_total"][0][1] == 1
    assert fams["kmesh_xds_reconnects_total"][0][1] == 2
    assert fams["kmesh_xds_resources"][0][1] == 9


def test_label_values_escaped() -> None:
    conn = ConnectionMetrics(Resolver(), Enroll())
    conn.on_event(event("established", service='ns/we"ird\\host\n'))
    check_exposition(MetricsSource(conn).render())


def test_metrics_http_endpoint() -> None:
    server = MetricsServer("127.0.0.1", 0, MetricsSource(ConnectionMetrics(Resolver(), Enroll())))
    server.start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status/metric", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            fams = check_exposition(resp.read().decode())
        assert fams.get("kmesh_tcp_connections_opened_total", []) == []
    finally:
        server.shutdown()
        server.server_close()


def test_monitoring_switch_gates_sinks_and_traces() -> None:
    """The hub reads the data plane's cached switch per event: metrics off = the counters stand
    still; access log off = no trace subscriber is fed; the hub keeps counting what arrives."""
    from daemon.events import MON_ACCESSLOG, MON_METRICS

    class Dp:
        mon_off = 0

    dp = Dp()
    conn = ConnectionMetrics(Resolver(), Enroll())
    hub = EventHub(dataplane=dp)
    hub.add_sink(conn.on_event, monitoring=MON_METRICS)
    sub = hub.subscribe(lambda _e: True)

    def closed() -> float:
        return sum(v for _, v in check_exposition(MetricsSource(conn).render())
                   .get("kmesh_tcp_connections_closed_total", []))

    hub.dispatch(event("close"))
    assert closed() == 1 and sub.get(0.1) is not None
    dp.mon_off = MON_METRICS
    hub.dispatch(event("close"))
    assert closed() == 1 and sub.get(0.1) is not None
    dp.mon_off = MON_ACCESSLOG
    hub.dispatch(event("close"))
    assert closed() == 2 and sub.get(0.1) is None
    dp.mon_off = 0
    hub.dispatch(event("close"))
    assert closed() == 3 and sub.get(0.1) is not None and hub.events_total == 4
