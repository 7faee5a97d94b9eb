"""The seed's walkthrough with a waypoint: kernel hand-off to a real Envoy waypoint, 90/10 at L7.

Everything is real and applied as a user would: sandbox up (istiod's ports), the samples,
``kmeshctl install``, ``kmeshctl enable ns default``, ``kmeshctl waypoint apply -n default
--enroll-namespace --wait``; then curl from the netutils pod to the fortio ClusterIP. The kernel
sends those connections to the waypoint pod (:15019 with Kmesh's TLV, or PROXY v2 to the Gateway's
binding port), the waypoint Envoy applies the VirtualService the pilot pushed over ADS.

Shares are checked against binomial bounds for n=200: 10% -> [2.5%, 18%], 50% -> [35%, 65%].
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import up as sb

REPO = Path(__file__).resolve().parents[2]
DAEMON_SCRIPT = REPO / ".venv" / "bin" / "kmesh-daemon"
FIXED_PORTS = {
    15012: "pilot TLS xDS",
    15010: "pilot plaintext xDS",
    15200: "daemon admin",
    15020: "daemon metrics",
}
N = 200
WAYPOINT_POD = "gateway.networking.k8s.io/gateway-name=waypoint"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (netns, cgroups, BPF)"
    if not DAEMON_SCRIPT.exists() and importlib.util.find_spec("daemon.main") is None:
        return "the kmesh daemon is absent"
    if not (REPO / "bpf" / "handoff.c").exists():
        return "the kernel hand-off to waypoints (bpf/handoff.c) is not in this tree"
    busy = [f"{p} ({what})" for p, what in FIXED_PORTS.items() if not sb.port_free(p)]
    if busy:
        return f"127.0.0.1 ports in use: {', '.join(busy)} (a running sandbox? `kmeshctl sandbox down`)"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]
SAMPLES = [REPO / "manifests/samples/fortio/fortio-route.yaml", REPO / "manifests/samples/netutils.yaml"]


@pytest.fixture(scope="module")
def walk(run_prefix: str, tmp_path_factory: pytest.TempPathFactory, sandbox_handle_cls: type) -> Iterator:
    directory = tmp_path_factory.mktemp("wpe2e")
    st = sb.up(directory, timeout=60, prefix=f"{run_prefix}w")
    h = sandbox_handle_cls(directory, st)
    try:
        for f in SAMPLES:
            h.kubectl("apply", "--server-side", "-f", str(f))
        r = h.kmeshctl("install", "--cluster-id", st.cluster_id, "--wait", "--timeout", "60s", timeout=90)
        assert r.returncode == 0, r.stderr + r.stdout
        r = h.kmeshctl("enable", "ns", "default")
        assert r.returncode == 0, r.stderr
        h.wait(lambda: all(_ready(h, d) for d in ("fortio-v1", "fortio-v2", "netutils")), 60, "samples ready")
        r = h.kmeshctl("waypoint", "apply", "-n", "default", "--enroll-namespace", "--wait", timeout=120)
        assert r.returncode == 0, r.stderr + r.stdout
        h.wait(lambda: _via_waypoint(h), 30, "requests to fortio going through the waypoint")
        yield h
    finally:
        sb.down(directory)


def _ready(h, deployment: str) -> bool:
    return h.get("deployment", deployment).get("status", {}).get("readyReplicas") == 1


def _vip(h, svc: str = "fortio") -> str:
    return h.get("service", svc)["spec"]["clusterIP"]


def _curl(h, n: int, *curl_args: str, svc: str = "fortio", path: str = "/", timeout: float = 2) -> list[str]:
    """`Server:` values of n requests (one connection each, as the seed's loop); '' = failed."""
    args = " ".join(f"'{a}'" for a in curl_args)
    loop = (
        f"for i in $(seq 1 {n}); do s=$(curl -s -m {timeout} -o /dev/null -D - {args} "
        f"http://{_vip(h, svc)}{path} | tr -d '\\r' | grep -i '^server:' | cut -d' ' -f2); "
        'echo "S=$s"; done'
    )
    r = h.kmeshctl("sandbox", "exec", "netutils", "--", "sh", "-c", loop, timeout=n * (timeout + 0.5) + 30)
    return [ln[2:] for ln in r.stdout.splitlines() if ln.startswith("S=")]


def _share(servers: list[str], version: str = "2") -> float:
    return servers.count(version) / max(1, len(servers))


def _debug(h, svc: str = "fortio") -> str:
    r = h.kmeshctl(
        "sandbox", "exec", "netutils", "--", "curl", "-s", "-m", "2", f"http://{_vip(h, svc)}/debug"
    )
    return r.stdout


def _via_waypoint(h, svc: str = "fortio") -> bool:
    return "x-request-id" in _debug(h, svc).lower()  # the waypoint's HCM adds it; the kernel path cannot


def _waypoint_pod(h) -> dict:
    return h.get("pods", "-l", WAYPOINT_POD)["items"][0]


def _envoy_admin(h, path: str) -> str:
    r = h.kmeshctl(
        "sandbox",
        "exec",
        _waypoint_pod(h)["metadata"]["name"],
        "--",
        "curl",
        "-s",
        f"http://127.0.0.1:15000{path}",
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _set_weights(h, v1: int, v2: int) -> None:
    vs = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "fortio", "namespace": "default"},
        "spec": {
            "hosts": ["fortio.default.svc.cluster.local"],
            "http": [
                {
                    "match": [{"headers": {"x-version": {"exact": "v2"}}}],
                    "route": [{"destination": {"host": "fortio.default.svc.cluster.local", "subset": "v2"}}],
                },
                {
                    "route": [
                        {
                            "destination": {"host": "fortio.default.svc.cluster.local", "subset": "v1"},
                            "weight": v1,
                        },
                        {
                            "destination": {"host": "fortio.default.svc.cluster.local", "subset": "v2"},
                            "weight": v2,
                        },
                    ]
                },
            ],
        },
    }
    h.kubectl("apply", "-f", "-", stdin=json.dumps(vs))


def test_walkthrough_90_10_through_the_waypoint(walk) -> None:
    servers = _curl(walk, N)
    assert len(servers) == N and set(servers) <= {"1", "2"}, servers
    assert 0.025 <= _share(servers) <= 0.18, f"v2 share {_share(servers):.1%}"


def test_config_dump_shows_kmesh_listener_cluster_and_weights(walk) -> None:
    dump = _envoy_admin(walk, "/config_dump")
    assert '"name": "kmesh-listener"' in dump and '"name": "kmesh_original_dst_cluster"' in dump
    assert '"weight": 90' in dump and '"weight": 10' in dump


def test_virtualservice_change_and_header_match(walk) -> None:
    _set_weights(walk, 50, 50)
    try:
        time.sleep(2.0)  # the acceptance's budget: within 2 s the share has moved
        servers = _curl(walk, N)
        assert 0.35 <= _share(servers) <= 0.65, f"v2 share {_share(servers):.1%}"
        assert _curl(walk, 30, "-H", "x-version: v2") == ["2"] * 30
    finally:
        _set_weights(walk, 90, 10)


def test_service_opted_out_is_balanced_in_the_kernel_only(walk) -> None:
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "fortio-l4",
            "namespace": "default",
            "labels": {"istio.io/use-waypoint": "none"},
        },
        "spec": {"selector": {"app": "fortio"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }
    walk.kubectl("apply", "-f", "-", stdin=json.dumps(svc))
    walk.wait(lambda: len(_curl(walk, 2, svc="fortio-l4")) == 2, 20, "fortio-l4 reachable")
    assert not _via_waypoint(walk, "fortio-l4")
    assert _via_waypoint(walk, "fortio")


def _envoy_pid(pod_name: str) -> int | None:
    """The waypoint container's process is Envoy itself; its bootstrap names the pod."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"--config-yaml" in cmd and f"~{pod_name}.".encode() in cmd:
            return int(proc.name)
    return None


def test_waypoint_pod_killed_is_restarted_and_the_split_resumes(walk) -> None:
    name = _waypoint_pod(walk)["metadata"]["name"]
    pid = _envoy_pid(name)
    assert pid is not None, f"no Envoy process for {name}"
    t0 = time.monotonic()
    os.kill(pid, 9)
    failures = 0
    while time.monotonic() - t0 < 60:  # one request at a time until the waypoint answers again
        if _curl(walk, 1, timeout=1) in (["1"], ["2"]):
            break
        failures += 1
    gap = time.monotonic() - t0
    assert gap < 60, "no answer within 60 s of the SIGKILL"
    status = _waypoint_pod(walk)["status"]["containerStatuses"][0]
    assert status.get("restartCount", 0) >= 1 and _envoy_pid(name) not in (None, pid)
    servers = _curl(walk, N)
    assert set(servers) <= {"1", "2"} and 0.025 <= _share(servers) <= 0.18, servers
    print(
        f"\nwaypoint SIGKILL: {failures} failed requests, answering again after {gap:.1f}s", file=sys.stderr
    )


def test_proxy_binding_variant(walk) -> None:
    walk.kubectl(
        "annotate",
        "gateway",
        "waypoint",
        "ambient.istio.io/waypoint-inbound-binding=PROXY/15088",
        "--overwrite",
    )
    try:
        walk.wait(
            lambda: "proxy_protocol_inbound" in _envoy_admin(walk, "/config_dump"), 20, "PROXY listener"
        )
        time.sleep(2.0)  # workload xDS (application_tunnel) reaches the daemon
        servers = _curl(walk, N)
        assert len(servers) == N and set(servers) <= {"1", "2"}, servers
        assert 0.025 <= _share(servers) <= 0.18, f"v2 share {_share(servers):.1%}"
        stats = _envoy_admin(walk, "/stats?filter=proxy_proto")
        found = [
            int(x.split(":")[1])
            for x in stats.splitlines()
            if x.split(":")[0].endswith("waypoint_inbound.versions.v2.found")
        ]
        assert found and found[0] >= N, stats
    finally:
        walk.kubectl("annotate", "gateway", "waypoint", "ambient.istio.io/waypoint-inbound-binding-")


def test_waypoint_deleted_back_to_kernel_l4(walk) -> None:
    r = walk.kmeshctl("waypoint", "delete", "waypoint", "-n", "default")
    assert r.returncode == 0, r.stderr
    time.sleep(2.0)
    servers = _curl(walk, N)
    failed = servers.count("")
    assert failed <= 2, f"{failed} requests failed after the waypoint was deleted"
    assert 0.35 <= _share([s for s in servers if s]) <= 0.65
    assert not _via_waypoint(walk)
