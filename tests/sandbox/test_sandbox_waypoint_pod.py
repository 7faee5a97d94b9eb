"""A waypoint pod in the sandbox: the catalog's proxyv2 image, configured by the pilot over its unix socket.

Objects are applied with kubectl as a user would: the fortio sample (Services, Deployments,
DestinationRule, VirtualService 90/10), the seed's EnvoyFilters, and a waypoint Gateway with the
PROXY binding annotation, which the pilot's gateway controller turns into a Deployment and
Service (istiod's waypoint template, image docker.io/istio/proxyv2:<revision's version>). The
waypoint pod has its own netns; it reaches the pilot only through the socket visible in its
filesystem view. Requests come from a netutils pod, PROXY v2 framed (what
the daemon sends for a PROXY-bound waypoint), so no kernel redirection is needed here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import pytest

from tests.sandbox.conftest import REPO, SandboxHandle
from tests.xds.waypoint_env import CLIENT

PROXY_PORT = 15088

WAYPOINT = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: default
  labels: {{istio.io/waypoint-for: service}}
  annotations: {{ambient.istio.io/waypoint-inbound-binding: PROXY/{PROXY_PORT}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"""


@pytest.fixture(scope="module")
def wp(sandbox: SandboxHandle) -> Iterator[SandboxHandle]:
    h = sandbox
    h.kubectl("label", "namespace", "default", "istio.io/use-waypoint=waypoint", "--overwrite")
    h.kubectl("apply", "-f", str(REPO / "manifests/samples/fortio/fortio-route.yaml"))
    h.kubectl("apply", "-f", str(REPO / "manifests/samples/netutils.yaml"))
    h.kubectl("apply", "-f", str(REPO / "manifests/envoyfilters/waypoint.yaml"))
    h.apply(WAYPOINT)
    for selector in ("app=fortio", "app=netutils", "gateway.networking.k8s.io/gateway-name=waypoint"):
        h.wait(
            lambda sel=selector: (
                all(_ready(p) for p in h.get("pods", "-n", "default", "-l", sel)["items"])
                and h.get("pods", "-n", "default", "-l", sel)["items"]
            ),
            90,
            f"pods {selector} Ready",
        )
    yield h


def _ready(pod: dict) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _pod(h: SandboxHandle, selector: str) -> dict:
    return h.get("pods", "-n", "default", "-l", selector)["items"][0]


def _exec(h: SandboxHandle, pod: str, *argv: str, timeout: float = 60) -> str:
    r = h.kmeshctl("sandbox", "exec", pod, "--", *argv, timeout=timeout)
    if r.returncode != 0:
        logs = h.kubectl("logs", pod, "--tail=40", check=False)
        status = h.kubectl("get", "pod", pod, "-o", "jsonpath={.status}", check=False)
        raise AssertionError(
            f"exec in {pod} failed: {r.stderr}\nstatus: {status.stdout}\nlogs: {logs.stdout}"
        )
    return r.stdout


def test_waypoint_pod_is_ready_and_configured(wp: SandboxHandle) -> None:
    pod = _pod(wp, "gateway.networking.k8s.io/gateway-name=waypoint")
    dump = json.loads(_exec(wp, pod["metadata"]["name"], "curl", "-sS", "http://127.0.0.1:15000/config_dump"))
    text = json.dumps(dump)
    assert '"name": "kmesh-listener"' in text and '"name": "kmesh_original_dst_cluster"' in text
    assert '"weight": 90' in text and '"weight": 10' in text
    assert "waypoint~" + pod["status"]["podIP"] in text  # the node id istio-agent would announce


def test_requests_through_the_waypoint_pod_split_90_10(wp: SandboxHandle) -> None:
    waypoint_ip = _pod(wp, "gateway.networking.k8s.io/gateway-name=waypoint")["status"]["podIP"]
    vip = wp.get("svc", "fortio", "-n", "default")["spec"]["clusterIP"]
    netutils = _pod(wp, "app=netutils")["metadata"]["name"]
    out = _exec(
        wp,
        netutils,
        sys.executable,
        "-c",
        CLIENT,
        "proxy",
        f"{waypoint_ip}:{PROXY_PORT}",
        "200",
        vip,
        "80",
        "{}",
        timeout=120,
    )
    counts = json.loads(out)
    v2 = sum(n for k, n in counts.items() if k.endswith("2"))
    assert sum(counts.values()) == 200 and not any(k.startswith("error") for k in counts), counts
    assert 0.025 <= v2 / 200 <= 0.18, counts
