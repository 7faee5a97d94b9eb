"""Prometheus metrics on ``:15020/status/metric`` (the DaemonSet's scrape annotations).

Why our own text writer: four counter families with Istio-style labels, a few gauges, and no
need for a client library's registry; the exposition format is simple and a test checks it.
Connection counters are counted in the kernel (km_conn_stats, keyed by netns cookie, service
id, backend id and verdict) and read at scrape time, like the gauges (map pressure, xDS
stream): a connection costs the daemon nothing, a scrape costs one map dump plus a label
lookup per new key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CONN_LABELS = (
    "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
    "destination_waypoint",  # the waypoint workload a via-waypoint connection went to, else "none"
)
COUNTERS = {
    "kmesh_tcp_connections_opened_total": "Total TCP connections opened (established) by managed pods.",
    "kmesh_tcp_connections_closed_total": "Total TCP connections closed by managed pods.",
    "kmesh_tcp_sent_bytes_total": "Bytes sent on closed TCP connections of managed pods.",
    "kmesh_tcp_received_bytes_total": "Bytes received on closed TCP connections of managed pods.",
}


def escape_label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(names: Iterable[str], values: Iterable[object]) -> str:
    inner = ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}" if inner else ""


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class MetricFamily:
    """One metric name with HELP/TYPE and labelled samples, rendered as exposition text."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[tuple[str, float]] = []

    def add(self, value: float, **labels: object) -> MetricFamily:
        self.samples.append((format_labels(labels.keys(), labels.values()), value))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{labels} {_num(value)}" for labels, value in self.samples]
        return "\n".join(lines) + "\n"


def _principal(info: dict[str, Any]) -> str:
    if not info.get("serviceAccount"):
        return "unknown"
    domain = info.get("trustDomain") or "cluster.local"
    return f"spiffe://{domain}/ns/{info['namespace']}/sa/{info['serviceAccount']}"


class ConnectionMetrics:
    """The four Istio-style TCP counters, from the kernel's km_conn_stats at scrape time.

    stats() returns ``[((netns_cookie, service_id, backend_id, verdict, orig_ip, orig_port),
    (opened, closed, bytes_sent, bytes_received)), ...]`` (``Dataplane.conn_stats``); names
    turns ids into names (``Dataplane.service_name`` / ``backend_uid``).

    Monotonic across LRU eviction, approximately: the kernel map is an LRU of 16384 keys, so a
    key may vanish (and later start again from 0). Each scrape adds, per key, what grew since
    the previous scrape (all of it for a key not seen before, or one whose counters went down:
    it was evicted and re-created) into totals per label tuple, which only grow. What a key
    gained between the last scrape and its eviction is lost; with fewer live keys than the map
    holds (the normal case) nothing is. Totals are per daemon process.
    """

    def __init__(self, resolver: Any, enroll: Any = None,
                 stats: Callable[[], list[tuple[tuple, tuple[int, int, int, int]]]] | None = None,
                 names: Any = None) -> None:
        self._resolver = resolver
        self._enroll = enroll
        self._stats = stats
        self._names = names
        self._lock = threading.Lock()
        self._last: dict[tuple, tuple[int, int, int, int]] = {}  # kernel key -> values at the last scrape
        self._totals: dict[tuple[str, ...], list[int]] = {}  # label tuple -> 4 monotonic totals
        self._labels: dict[tuple, tuple[object, tuple[str, ...]]] = {}  # kernel key -> (stamp, labels)

    def labels_for(self, ev: dict[str, Any]) -> tuple[str, ...]:
        src_pod = self._enroll.by_cookie(ev.get("netns_cookie", 0)) if self._enroll is not None else None
        src: dict[str, Any] = {}
        if src_pod is not None and self._resolver is not None:
            uid = self._resolver.workload_uid(ip=src_pod.ips[0] if src_pod.ips else "",
                                              namespace=src_pod.namespace, name=src_pod.name)
            src = self._resolver.workload(uid) or {"namespace": src_pod.namespace, "name": src_pod.name,
                                                   "workloadName": src_pod.name}
        dst: dict[str, Any] = {}
        service = ev.get("service") or ""
        if self._resolver is not None:
            uid = ev.get("backend_uid") or self._resolver.workload_uid(ip=ev.get("backend_ip", ""))
            dst = self._resolver.workload(uid)
            service = service or self._resolver.service_for_vip(ev.get("orig_ip", ""))
        svc_ns, _, host = service.partition("/") if "/" in service else ("", "", service)
        return (
            "source",
            src.get("workloadName", "unknown") or "unknown",
            src.get("canonicalName", "unknown") or "unknown",
            src.get("canonicalRevision", "latest") or "latest",
            src.get("namespace", "unknown") or "unknown",
            _principal(src) if src else "unknown",
            src.get("clusterId", "unknown") or "unknown",
            host or (f"{ev.get('orig_ip', '')}:{ev.get('orig_port', 0)}" if ev.get("orig_ip") else "unknown"),
            svc_ns or "unknown",
            host.split(".")[0] if host else "unknown",
            dst.get("workloadName", "unknown") or "unknown",
            dst.get("canonicalName", "unknown") or "unknown",
            dst.get("canonicalRevision", "latest") or "latest",
            dst.get("namespace", "unknown") or "unknown",
            _principal(dst) if dst else "unknown",
            dst.get("clusterId", "unknown") or "unknown",
            "tcp",
            "-",
            "none",
            (dst.get("workloadName", "") or dst.get("name", "") or "unknown")
            if ev.get("verdict") == "via_waypoint" else "none",
        )

    def _key_labels(self, key: tuple) -> tuple[str, ...]:
        """Labels of one kernel key, cached until the state or that netns's enrolment changes."""
        netns, sid, bid, verdict, orig_ip, orig_port = key
        src = self._enroll.by_cookie(netns) if self._enroll is not None else None
        stamp = (getattr(self._resolver, "stamp", None), id(src) if src is not None else None)
        cached = self._labels.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        names = self._names
        ev = {"netns_cookie": netns, "verdict": verdict, "orig_ip": orig_ip, "orig_port": orig_port,
              "backend_ip": orig_ip if not bid else "",
              "service": names.service_name(sid) if sid and names is not None else "",
              "backend_uid": names.backend_uid(bid) if bid and names is not None else ""}
        labels = self.labels_for(ev)
        self._labels[key] = (stamp, labels)
        return labels

    def collect(self) -> None:
        """Fold the kernel's counters into the monotonic totals (called by every scrape)."""
        if self._stats is None:
            return
        with self._lock:  # read under the lock: concurrent scrapes must fold in order
            rows = self._stats()
            last, seen = self._last, {}
            for key, vals in rows:
                prev = last.get(key)
                if prev is None or any(v < p for v, p in zip(vals, prev, strict=True)):
                    delta = vals  # new key, or evicted and re-created since the last scrape
                else:
                    delta = tuple(v - p for v, p in zip(vals, prev, strict=True))
                seen[key] = vals
                if not any(delta) and key in self._labels:
                    continue
                total = self._totals.setdefault(self._key_labels(key), [0, 0, 0, 0])
                for i, d in enumerate(delta):
                    total[i] += d
            self._last = seen
            for key in [k for k in self._labels if k not in seen]:  # evicted: relabel if it returns
                del self._labels[key]

    def families(self) -> list[MetricFamily]:
        try:
            self.collect()
        except OSError:  # a scrape must still return the other metrics (and what was counted)
            pass
        out = []
        with self._lock:
            rows = sorted(self._totals.items())
        for i, (name, help_text) in enumerate(COUNTERS.items()):
            fam = MetricFamily(name, "counter", help_text)
            for labels, values in rows:
                if not values[0 if i == 0 else 1]:  # as Istio: a series appears once it counts
                    continue
                fam.samples.append((format_labels(CONN_LABELS, labels), values[i]))
            out.append(fam)
        return out


def map_families(pressure: dict[str, dict[str, Any]]) -> list[MetricFamily]:
    entries = MetricFamily("kmesh_map_entries", "gauge", "Entries in each BPF map.")
    maxes = MetricFamily("kmesh_map_max_entries", "gauge", "Capacity of each BPF map.")
    ratio = MetricFamily("kmesh_bpf_map_pressure", "gauge", "Fill ratio (entries / max) of each BPF map.")
    for name, p in sorted(pressure.items()):
        entries.add(p.get("entries", 0), map=name)
        maxes.add(p.get("max", 0), map=name)
        ratio.add(p.get("ratio", 0.0), map=name)
    return [entries, maxes, ratio]


def xds_families(status: dict[str, Any]) -> list[MetricFamily]:
    labels = {"address": status.get("address", ""), "cluster_id": status.get("cluster_id", "")}
    return [
        MetricFamily("kmesh_xds_connected", "gauge", "1 while the xDS stream is up.")
        .add(bool(status.get("connected")), **labels),
        MetricFamily("kmesh_xds_ready", "gauge", "1 once every subscribed type was received.")
        .add(bool(status.get("ready")), **labels),
        MetricFamily("kmesh_xds_acks_total", "counter", "xDS responses ACKed.")
        .add(status.get("acks", 0), **labels),
        MetricFamily("kmesh_xds_nacks_total", "counter", "xDS responses NACKed.")
        .add(status.get("nacks", 0), **labels),
        MetricFamily("kmesh_xds_reconnects_total", "counter", "xDS stream reconnects.")
        .add(status.get("reconnects", 0), **labels),
    ]


def _resource_family(status: dict[str, Any]) -> MetricFamily:
    fam = MetricFamily("kmesh_xds_resources", "gauge", "Resources held, per xDS type.")
    for type_url, count in sorted((status.get("resources") or {}).items()):
        fam.add(count, type=type_url)
    return fam


class MetricsSource:
    """Everything /status/metric shows, gathered at scrape time."""

    def __init__(self, conn: ConnectionMetrics | None, pressure: Callable[[], dict] | None = None,
                 xds_status: Callable[[], dict] | None = None,
                 extra: Callable[[], list[MetricFamily]] | None = None) -> None:
        self.conn, self.pressure, self.xds_status, self.extra = conn, pressure, xds_status, extra

    def render(self) -> str:
        fams: list[MetricFamily] = []
        if self.conn is not None:
            fams += self.conn.families()
        if self.pressure is not None:
            try:
                fams += map_families(self.pressure())
            except Exception:  # noqa: BLE001 - a scrape must still return the other metrics
                pass
        if self.xds_status is not None:
            status = self.xds_status()
            fams += xds_families(status)
            fams.append(_resource_family(status))
        if self.extra is not None:
            fams += self.extra()
        return "".join(f.render() for f in fams)


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        if self.path.split("?")[0] not in ("/status/metric", "/metrics"):
            self.send_error(404, "metrics are at /status/metric")
            return
        body = self.server.source.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
        return


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, source: MetricsSource) -> None:
        self.source = source
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((host, port), _MetricsHandler)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return thread
