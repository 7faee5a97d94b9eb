"""Prometheus exposition text: connection counters (read from the kernel's km_conn_stats at
scrape time, here a table standing in for Dataplane.conn_stats) with Istio labels, gauges."""

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


FORTIO_UID = "Kubernetes//Pod/default/fortio-v1-abc"


class Kernel:
    """Dataplane.conn_stats / service_name / backend_uid over a table the test edits."""

    def __init__(self) -> None:
        self.rows: dict[tuple, tuple[int, int, int, int]] = {}
        self.services = {1: "default/fortio.default.svc.cluster.local"}
        self.backends = {7: FORTIO_UID}

    def conn_stats(self) -> list:
        return list(self.rows.items())

    def service_name(self, sid: int) -> str:
        return self.services.get(sid, f"#{sid}")

    def backend_uid(self, bid: int) -> str:
        return self.backends.get(bid, f"#{bid}")

    def add(self, key: tuple, opened: int = 0, closed: int = 0, sent: int = 0, received: int = 0) -> None:
        v = self.rows.get(key, (0, 0, 0, 0))
        self.rows[key] = (v[0] + opened, v[1] + closed, v[2] + sent, v[3] + received)


KEY = (4242, 1, 7, "translated", "", 0)  # netns cookie, service id, backend id, verdict, orig ip/port


def metrics(kernel: Kernel, resolver: object = None) -> ConnectionMetrics:
    return ConnectionMetrics(resolver or Resolver(), Enroll(), stats=kernel.conn_stats, names=kernel)


def event(kind: str, **kw) -> dict:
    base = {"ts_ns": 1, "kind": kind, "verdict": "translated", "netns_cookie": 4242, "sock_cookie": 7,
            "orig_ip": "10.96.0.10", "orig_port": 80, "backend_ip": "10.244.0.7", "backend_port": 8080,
            "service": "", "backend_uid": "Kubernetes//Pod/default/fortio-v1-abc", "bytes_sent": 0,
            "bytes_received": 0, "srtt_us": 0, "duration_ns": 0}
    base.update(kw)
    return base


def test_connection_counters_with_istio_labels() -> None:
    kernel = Kernel()
    conn = metrics(kernel)
    kernel.add(KEY, opened=3, closed=3, sent=300, received=3000)
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
    kernel = Kernel()
    kernel.services[2] = 'ns/we"ird\\host\n'
    kernel.add((4242, 2, 7, "translated", "", 0), opened=1)
    check_exposition(MetricsSource(metrics(kernel)).render())


def test_counters_monotonic_across_eviction() -> None:
    """Scrapes fold deltas: a key that vanishes (LRU eviction) keeps its totals, one that comes
    back from zero adds all it has; a passthrough key is named by its address."""
    kernel = Kernel()
    conn = metrics(kernel)

    def opened() -> dict[str, float]:
        fams = check_exposition(MetricsSource(conn).render())
        return dict(fams.get("kmesh_tcp_connections_opened_total", []))

    kernel.add(KEY, opened=5, closed=4)
    (total,) = opened().values()
    assert total == 5
    del kernel.rows[KEY]  # evicted
    assert list(opened().values()) == [5]
    kernel.add(KEY, opened=2)  # re-created: counts from 0
    assert list(opened().values()) == [7]
    kernel.add(KEY, opened=1)
    assert list(opened().values()) == [8]
    kernel.add((4242, 0, 0, "passthrough", "192.0.2.1", 443), opened=1)
    by_label = opened()
    assert len(by_label) == 2
    assert any('destination_service="192.0.2.1:443"' in lab and v == 1
               for lab, v in by_label.items()), by_label


def test_metrics_http_endpoint() -> None:
    server = MetricsServer("127.0.0.1", 0, MetricsSource(metrics(Kernel())))
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


def test_monitoring_switch_gates_traces_and_consumers_switch_events() -> None:
    """The hub reads the data plane's cached switch per event: access log off = no trace
    subscriber is fed (the hub keeps counting what arrives). It tells the data plane whether
    anyone consumes events: the first subscriber switches them on, the last one off."""
    from daemon.events import MON_ACCESSLOG, MON_METRICS

    class Dp:
        mon_off = 0
        trace: list[bool] = []

        def set_trace(self, on: bool) -> None:
            self.trace.append(on)

    dp = Dp()
    hub = EventHub(dataplane=dp)
    hub.refresh_consumers()
    assert dp.trace == [False]
    sub = hub.subscribe(lambda _e: True)
    assert dp.trace == [False, True]
    hub.dispatch(event("close"))
    assert sub.get(0.1) is not None
    dp.mon_off = MON_METRICS
    hub.dispatch(event("close"))
    assert sub.get(0.1) is not None
    dp.mon_off = MON_ACCESSLOG
    hub.dispatch(event("close"))
    assert sub.get(0.1) is None
    dp.mon_off = 0
    hub.dispatch(event("close"))
    assert sub.get(0.1) is not None and hub.events_total == 4
    second = hub.subscribe(lambda _e: True)
    hub.unsubscribe(sub)
    assert dp.trace == [False, True]  # one consumer left
    hub.unsubscribe(second)
    assert dp.trace == [False, True, False]
