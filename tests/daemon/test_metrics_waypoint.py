"""A via-waypoint connection's metrics name the waypoint in the destination_waypoint label."""

from __future__ import annotations

from daemon.metrics import MetricsSource
from tests.daemon.test_metrics import KEY, Kernel, Resolver, check_exposition, metrics

WP_UID = "Kubernetes//Pod/default/waypoint-7d9f"


class WpResolver(Resolver):
    workloads = {**Resolver.workloads, WP_UID: {"uid": WP_UID, "name": "waypoint-7d9f",
                                                "namespace": "default", "workloadName": "waypoint"}}


def test_destination_waypoint_label() -> None:
    kernel = Kernel()
    kernel.backends[9] = WP_UID
    conn = metrics(kernel, WpResolver())
    kernel.add((4242, 1, 9, "via_waypoint", "", 0), opened=1)
    kernel.add(KEY, opened=1)
    fams = check_exposition(MetricsSource(conn).render())
    labels = sorted(lab for lab, _ in fams["kmesh_tcp_connections_opened_total"])
    assert len(labels) == 2
    via = next(lab for lab in labels if 'destination_waypoint="waypoint"' in lab)
    assert 'destination_service="fortio.default.svc.cluster.local"' in via
    plain = next(lab for lab in labels if lab != via)
    assert 'destination_waypoint="none"' in plain and 'destination_workload="fortio-v1"' in plain
