"""A via-waypoint connection's metrics name the waypoint in the destination_waypoint label."""

from __future__ import annotations

from daemon.metrics import ConnectionMetrics, MetricsSource
from tests.daemon.test_metrics import Enroll, Resolver, check_exposition, event

WP_UID = "Kubernetes//Pod/default/waypoint-7d9f"


class WpResolver(Resolver):
    workloads = {**Resolver.workloads, WP_UID: {"uid": WP_UID, "name": "waypoint-7d9f",
                                                "namespace": "default", "workloadName": "waypoint"}}


def test_destination_waypoint_label() -> None:
    conn = ConnectionMetrics(WpResolver(), Enroll())
    conn.on_event(event("established", verdict="via_waypoint", backend_uid=WP_UID, backend_ip="10.244.0.9",
                        backend_port=15019))
    conn.on_event(event("established"))
    fams = check_exposition(MetricsSource(conn).render())
    labels = sorted(lab for lab, _ in fams["kmesh_tcp_connections_opened_total"])
    assert len(labels) == 2
    via = next(lab for lab in labels if 'destination_waypoint="waypoint"' in lab)
    assert 'destination_service="fortio.default.svc.cluster.local"' in via
    plain = next(lab for lab in labels if lab != via)
    assert 'destination_waypoint="none"' in plain and 'destination_workload="fortio-v1"' in plain
