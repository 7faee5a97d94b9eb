"""kmeshctl dump tables (istioctl ztunnel-config layout) and trace lines, from sample dumps."""

from __future__ import annotations

import json
import time

from kmeshctl.dump import (
    bpf_json,
    format_table,
    json_section,
    render_policies,
    render_services,
    render_workloads,
)
from kmeshctl.trace import format_event, short_service

DUMP = {
    "workloads": [
        {
            "uid": "Kubernetes//Pod/default/httpbin-7447985f87-t8hv7",
            "workloadIps": ["10.244.1.40"],
            "protocol": "TCP",
            "status": "Healthy",
            "name": "httpbin-7447985f87-t8hv7",
            "namespace": "default",
            "node": "ambient-worker",
        },
        {
            "uid": "Kubernetes//Pod/bookinfo/details-v1-698d88b-dqrbr",
            "workloadIps": ["10.244.2.51"],
            "protocol": "HBONE",
            "status": "Unhealthy",
            "name": "details-v1-698d88b-dqrbr",
            "namespace": "bookinfo",
            "node": "ambient-worker2",
            "waypoint": {"destination": "/10.96.5.5", "hboneMtlsPort": 15008},
        },
        {
            "uid": "Kubernetes//Pod/bookinfo/ratings",
            "workloadIps": [],
            "hostname": "ratings.example.com",
            "protocol": "TCP",
            "status": "Healthy",
            "name": "ratings",
            "namespace": "bookinfo",
            "node": "",
            "waypoint": {"destination": "/10.9.9.9", "hboneMtlsPort": 15008},
        },
    ],
    "services": [
        {
            "name": "reviews",
            "namespace": "bookinfo",
            "hostname": "reviews.bookinfo.svc.cluster.local",
            "vips": ["/10.96.74.131"],
            "endpoints": {
                "a:/10.0.0.1": {"status": "Healthy"},
                "b:/10.0.0.2": {"status": "Healthy"},
                "c:/10.0.0.3": {"status": "Unhealthy"},
            },
        },
        {
            "name": "kubernetes",
            "namespace": "default",
            "hostname": "kubernetes.default.svc.cluster.local",
            "vips": ["/10.96.0.1"],
            "endpoints": {},
        },
        {
            "name": "namespace-istio-waypoint",
            "namespace": "bookinfo",
            "hostname": "namespace-istio-waypoint.bookinfo.svc.cluster.local",
            "vips": ["/10.96.5.5"],
            "endpoints": {},
            "waypoint": {"destination": "bookinfo/reviews.bookinfo.svc.cluster.local"},
        },
    ],
    "policies": [
        {"name": "allow-waypoint", "namespace": "default", "scope": "WorkloadSelector", "action": "Allow"},
        {"name": "allow-nothing", "namespace": "default", "scope": "Namespace", "action": "Allow"},
    ],
}


def test_workload_table() -> None:
    assert render_workloads(DUMP) == (
        "NAMESPACE POD NAME                 ADDRESS             NODE            WAYPOINT                 "
        "PROTOCOL STATUS\n"
        "bookinfo  details-v1-698d88b-dqrbr 10.244.2.51         ambient-worker2 namespace-istio-waypoint "
        "HBONE    Unhealthy\n"
        "bookinfo  ratings                  ratings.example.com                 NA                       "
        "TCP      Healthy\n"
        "default   httpbin-7447985f87-t8hv7 10.244.1.40         ambient-worker  None                     "
        "TCP      Healthy\n"
    )


def test_service_table() -> None:
    assert render_services(DUMP) == (
        "NAMESPACE SERVICE NAME             SERVICE VIP  WAYPOINT ENDPOINTS\n"
        "bookinfo  namespace-istio-waypoint 10.96.5.5    reviews  0/0\n"
        "bookinfo  reviews                  10.96.74.131 None     2/3\n"
        "default   kubernetes               10.96.0.1    None     0/0\n"
    )


def test_policy_table() -> None:
    assert render_policies(DUMP) == (
        "NAMESPACE POLICY NAME    ACTION SCOPE\n"
        "default   allow-nothing  Allow  Namespace\n"
        "default   allow-waypoint Allow  WorkloadSelector\n"
    )


def test_empty_tables_have_headers() -> None:
    assert render_workloads({}) == "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL STATUS\n"
    assert format_table(("A", "B"), []) == "A B\n"


def test_json_sections_sorted_and_stable() -> None:
    wl = json_section(DUMP, "workloads")
    assert [w["name"] for w in wl] == ["details-v1-698d88b-dqrbr", "ratings", "httpbin-7447985f87-t8hv7"]
    assert json.loads(json.dumps(json_section(DUMP, "policies")))[0]["name"] == "allow-nothing"
    a = {"maps": {"frontends": [{"ip": "b"}, {"ip": "a"}]}, "raw": {"frontend": [["02", "x"], ["01", "y"]]}}
    assert bpf_json(a)["maps"]["frontends"] == [{"ip": "a"}, {"ip": "b"}]
    assert bpf_json(a)["raw"]["frontend"] == [["01", "y"], ["02", "x"]]


def test_trace_lines() -> None:
    base = {
        "time": "2026-11-25T17:50:01.123Z",
        "source": {"namespace": "default", "pod": "netutils"},
        "original": {"ip": "10.96.0.10", "port": 80, "service": "default/fortio.default.svc.cluster.local"},
        "backend": {"ip": "10.244.0.7", "port": 8080, "namespace": "default", "pod": "fortio-v1-abc"},
        "verdict": "translated",
    }
    assert format_event(dict(base, kind="connect")) == (
        "Nov 25 17:50:01.123: default/netutils -> 10.96.0.10:80 (default/fortio) "
        "=> default/fortio-v1-abc 10.244.0.7:8080 TRANSLATED"
    )
    close = format_event(
        dict(base, kind="close", bytes_sent=78, bytes_received=512, duration_ms=1.5, srtt_us=42)
    )
    assert close.endswith("CLOSED sent=78B recv=512B duration=1.5ms rtt=42us")
    passthrough = format_event(
        dict(base, kind="connect", verdict="passthrough", backend={"ip": "10.96.0.10", "port": 80})
    )
    assert passthrough.endswith("10.96.0.10:80 (default/fortio) PASSTHROUGH")
    assert short_service("ns/ext.example.com") == "ns/ext.example.com"


def big_dump(n: int) -> dict:
    services = [
        {
            "name": f"svc-{i}",
            "namespace": f"ns-{i % 50}",
            "hostname": f"svc-{i}.ns-{i % 50}.svc",
            "vips": [f"/10.96.{i // 250}.{i % 250}"],
        }
        for i in range(n // 10)
    ]
    workloads = [
        {
            "uid": f"Kubernetes//Pod/ns-{i % 50}/pod-{i}",
            "workloadIps": [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"],
            "protocol": "TCP",
            "status": "Healthy",
            "name": f"app-{i % 97}-7d9f8c6b5-{i:05d}",
            "namespace": f"ns-{i % 50}",
            "node": f"node-{i % 20}",
            "waypoint": {"destination": f"/10.96.0.{i % 7}"} if i % 3 == 0 else None,
        }
        for i in range(n)
    ]
    return {"workloads": workloads, "services": services, "policies": []}


def test_ten_thousand_workloads_render_fast() -> None:
    """The formatting part of `dump workloads` over 10k workloads: far below the 1 s budget."""
    dump = big_dump(10_000)
    t0 = time.perf_counter()
    text = render_workloads(dump)
    elapsed = time.perf_counter() - t0
    assert text.count("\n") == 10_001
    assert elapsed < 0.5, elapsed


BPF = {
    "maps": {
        "frontends": [
            {
                "address": "10.66.0.3",
                "port": 0,
                "family": "ipv4",
                "id": 3,
                "kind": "backend",
                "backend": "Kubernetes//Pod/app/be1",
            },
            {
                "address": "10.96.0.3",
                "port": 80,
                "family": "ipv4",
                "id": 7,
                "kind": "service",
                "service": "app/echo.app.svc.cluster.local",
                "service_port": 80,
            },
            {
                "address": "10.96.0.1",
                "port": 443,
                "family": "ipv4",
                "id": 5,
                "kind": "service",
                "service": "default/kubernetes.default.svc.cluster.local",
                "service_port": 443,
            },
        ],
        "services": [
            {
                "id": 7,
                "name": "app/echo.app.svc.cluster.local",
                "port": 80,
                "lb_mode": "RANDOM",
                "endpoint_counts": [2, 0, 0, 0, 0, 0, 0],
            },
            {
                "id": 5,
                "name": "default/kubernetes.default.svc.cluster.local",
                "port": 443,
                "lb_mode": "RANDOM",
                "endpoint_counts": [0] * 7,
            },
        ],
        "endpoints": [
            {
                "service": "app/echo.app.svc.cluster.local",
                "port": 80,
                "service_id": 7,
                "priority": 0,
                "slot": 1,
                "backend_id": 4,
                "backend": "Kubernetes//Pod/app/be2",
                "target_port": 8080,
            },
            {
                "service": "app/echo.app.svc.cluster.local",
                "port": 80,
                "service_id": 7,
                "priority": 0,
                "slot": 0,
                "backend_id": 3,
                "backend": "Kubernetes//Pod/app/be1",
                "target_port": 8080,
            },
        ],
        "backends": [
            {
                "id": 3,
                "uid": "Kubernetes//Pod/app/be1",
                "name": "be1",
                "namespace": "app",
                "ipv4": "10.66.0.3",
                "ipv6": None,
            },
            {
                "id": 4,
                "uid": "Kubernetes//Pod/app/be2",
                "name": "be2",
                "namespace": "app",
                "ipv4": "10.66.0.4",
                "ipv6": None,
            },
        ],
        "manage": [{"netns_cookie": 1382}, {"netns_cookie": 999}],
    },
    "enrolled": [
        {"namespace": "app", "name": "cli", "netns_cookie": 1382},
        {"namespace": "app", "name": "gone", "netns_cookie": 5},
    ],
    "pressure": {"frontend": {"entries": 3, "max": 100, "ratio": 0.03}},
}


def test_bpf_tree() -> None:
    from kmeshctl.dump import render_bpf

    lines = render_bpf(BPF).splitlines()
    assert lines[0].startswith("FRONTEND")
    body = [line for line in lines[1:] if line]
    assert body[0].startswith("10.96.0.1:443") and "(no endpoints)" in body[1]
    assert body[2].split() == ["10.96.0.3:80", "app/echo.app.svc.cluster.local", "[RANDOM]"]
    assert body[3].split() == ["10.66.0.3:8080", "(app/be1)", "(0/0)"]
    assert body[4].split() == ["10.66.0.4:8080", "(app/be2)", "(0/1)"]
    assert body[5].split() == ["10.66.0.3", "pod", "app/be1", "(backend)"]
    text = "\n".join(lines)
    assert "1382                    app/cli" in text
    assert "5                       app/gone  (MISSING from manage map)" in text
    assert "999                     (unknown pod)" in text
    assert "frontend 3       100 3.0%" in text
