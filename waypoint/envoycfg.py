"""Envoy config fragments (JSON form, ``typed_config`` with ``@type``) for the kmesh_tlv hand-off.

Why a module: the waypoint tests, the sandbox's waypoint and the benchmark all need the same
listener filters in the same order, and the order is the contract:

1. the ``kmesh_tlv`` dynamic module reads the kernel's TLV, restores the local address to the
   original destination and drains the header;
2. Envoy's stock ``set_filter_state`` listener filter copies that restored address
   (``%DOWNSTREAM_LOCAL_ADDRESS%``) into filter state ``envoy.filters.listener.original_dst.local_ip``
   shared with the upstream connection ONCE, which is how an internal listener behind cluster
   ``main_internal`` (its ``original_dst`` listener filter) learns the original VIP:port. The
   dynamic-module ABI's filter-state setters store connection-scoped state that is not shared
   with upstream, so the module cannot do this step itself (tests/waypoint probes it).

The other helpers build the rest of the waypoint shape (internal listener, ``main_internal``
cluster, ORIGINAL_DST cluster, a chain matcher on the original destination) for tests and callers.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from typing import Any

from waypoint.module import MODULE_NAME

#: Kmesh's kernel redirects via-waypoint connections to this port of the waypoint pod.
KMESH_TLV_PORT = 15019
DEFAULT_TIMEOUT_MS = 5000
#: prefix of the module's counters in Envoy's /stats (``kmesh_tlv.header_ok`` ...)
METRICS_NAMESPACE = "kmesh_tlv"
COUNTERS = ("header_ok", "header_malformed", "header_oversized", "header_timeout", "header_truncated",
            "header_rejected")
ORIGINAL_DST_LOCAL_IP = "envoy.filters.listener.original_dst.local_ip"

_T = "type.googleapis.com/"
_PORT_INPUT = "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"
Json = dict[str, Any]


def _typed(name: str, type_url: str, **fields: Any) -> Json:
    return {"name": name, "typed_config": {"@type": _T + type_url, **fields}}


def kmesh_tlv_module_filter(timeout_ms: int = DEFAULT_TIMEOUT_MS, typed_filter_state: bool = False) -> Json:
    """The dynamic-module listener filter alone. `timeout_ms` bounds how long a connection may
    take to deliver a complete header before it is closed and counted (``header_timeout``)."""
    if not 1 <= int(timeout_ms) <= 3_600_000:
        raise ValueError(f"timeout_ms must be 1..3600000, got {timeout_ms}")
    cfg: dict[str, Any] = {"timeout_ms": int(timeout_ms)}
    if typed_filter_state:
        cfg["typed_filter_state"] = True
    return _typed(
        "kmesh_tlv",
        "envoy.extensions.filters.listener.dynamic_modules.v3.DynamicModuleListenerFilter",
        dynamic_module_config={"name": MODULE_NAME, "metrics_namespace": METRICS_NAMESPACE},
        filter_name="kmesh_tlv",
        filter_config={"@type": _T + "google.protobuf.StringValue", "value": json.dumps(cfg)},
    )


def share_original_dst_filter() -> Json:
    """Stock listener filter: the (restored) local address into original_dst.local_ip, shared
    with the upstream connection once (so an internal listener sees it, and nothing beyond)."""
    return _typed(
        "envoy.filters.listener.set_filter_state",
        "envoy.extensions.filters.listener.set_filter_state.v3.Config",
        on_accept=[{
            "object_key": ORIGINAL_DST_LOCAL_IP,
            "format_string": {"text_format_source": {"inline_string": "%DOWNSTREAM_LOCAL_ADDRESS%"}},
            "shared_with_upstream": "ONCE",
        }],
    )


def kmesh_tlv_listener_filters(timeout_ms: int = DEFAULT_TIMEOUT_MS,
                               share_original_dst: bool = True) -> list[Json]:
    """The listener filters of the kmesh_tlv hand-off, in order (module, then filter state)."""
    filters = [kmesh_tlv_module_filter(timeout_ms)]
    if share_original_dst:
        filters.append(share_original_dst_filter())
    return filters


def internal_listener_bootstrap_extension() -> Json:
    """Bootstrap extension that enables internal listeners (required once per Envoy)."""
    return _typed("envoy.bootstrap.internal_listener",
                  "envoy.extensions.bootstrap.internal_listener.v3.InternalListener")


#: Envoy 1.40 runtime flags a waypoint with internal listeners needs. With
#: ``enable_send_rst_on_user_space_socket`` on (the 1.40 default) an internal-listener connection
#: that closes right after its last write (an HTTP/1.1 ``Connection: close`` response) reaches
#: the tcp_proxy in front of ``main_internal`` as a reset, which is then propagated downstream as
#: an RST and the response body is lost (tests/waypoint shows it; cf. envoyproxy/envoy#45190).
WAYPOINT_RUNTIME_FLAGS = {"envoy.reloadable_features.enable_send_rst_on_user_space_socket": False}


def waypoint_layered_runtime() -> Json:
    """Bootstrap ``layered_runtime`` with WAYPOINT_RUNTIME_FLAGS as a static layer."""
    return {"layers": [{"name": "waypoint-static", "static_layer": dict(WAYPOINT_RUNTIME_FLAGS)}]}


def socket_address(ip: str, port: int) -> Json:
    return {"socket_address": {"address": ip, "port_value": int(port)}}


def tcp_proxy(cluster: str, stat_prefix: str | None = None) -> Json:
    return _typed("envoy.filters.network.tcp_proxy",
                  "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                  stat_prefix=stat_prefix or cluster, cluster=cluster)


def original_dst_cluster(name: str = "kmesh_original_dst_cluster", connect_timeout: str = "5s") -> Json:
    """ORIGINAL_DST cluster: the upstream host is the connection's (restored) local address."""
    return {"name": name, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": connect_timeout}


def static_cluster(name: str, endpoints: Sequence[tuple[str, int]], connect_timeout: str = "5s") -> Json:
    return {"name": name, "type": "STATIC", "connect_timeout": connect_timeout,
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": socket_address(ip, port)}} for ip, port in endpoints]}]}}


def main_internal_cluster(name: str = "main_internal", listener_name: str = "main_internal") -> Json:
    """STATIC cluster whose one endpoint is the internal listener `listener_name`, over the
    internal_upstream transport socket (which carries shared filter state across)."""
    return {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"envoy_internal_address": {"server_listener_name": listener_name}}}}]}]},
        "transport_socket": _typed(
            "envoy.transport_sockets.internal_upstream",
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            transport_socket=_typed("envoy.transport_sockets.raw_buffer",
                                    "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer")),
    }


TCP_DEFER_ACCEPT = 9  # linux/tcp.h
IPPROTO_TCP = 6


def defer_accept_option(seconds: int = 1) -> Json:
    """Listener socket option TCP_DEFER_ACCEPT: the kernel hands a connection to Envoy only once
    its first bytes (our header, glued to the first application bytes) have arrived, or after
    about `seconds` without any.

    Why: Envoy 1.40 drops a connection whose peer half-closes while a listener filter is still
    waiting (its listener-filter buffer treats EPOLLRDHUP as "closed" before peeking). A client
    that writes once and shuts down at once would lose that race whenever Envoy accepted before
    the data arrived; deferred, the module finds the whole header in the socket at accept time.
    Kept short: a silent connection is only accepted (and then timed out) after it."""
    return {"level": IPPROTO_TCP, "name": TCP_DEFER_ACCEPT, "int_value": int(seconds),
            "state": "STATE_PREBIND"}


def kmesh_tlv_listener_fields(timeout_ms: int = DEFAULT_TIMEOUT_MS) -> Json:
    """Everything a listener needs for the hand-off, to merge into one you build yourself:
    the listener filters, TCP_DEFER_ACCEPT (see defer_accept_option: without it Envoy 1.40 drops
    a client that writes once and half-closes at once) and a ``listener_filters_timeout`` a
    little above the module's timeout as a backstop (the module closes and counts first)."""
    backstop_ms = int(timeout_ms) + 2000
    return {
        "listener_filters": kmesh_tlv_listener_filters(timeout_ms),
        "listener_filters_timeout": f"{backstop_ms / 1000:.3f}s",
        "socket_options": [defer_accept_option()],
    }


def kmesh_tlv_listener(port: int = KMESH_TLV_PORT, address: str = "0.0.0.0", cluster: str = "main_internal",
                       timeout_ms: int = DEFAULT_TIMEOUT_MS, name: str = "kmesh-listener",
                       extra_addresses: Sequence[str] = ()) -> Json:
    """The :15019 listener: kmesh_tlv_listener_fields, then one TCP chain forwarding to `cluster`."""
    listener: Json = {
        "name": name,
        "address": socket_address(address, port),
        **kmesh_tlv_listener_fields(timeout_ms),
        "filter_chains": [{"name": "to-" + cluster, "filters": [tcp_proxy(cluster, "kmesh_tlv_" + cluster)]}],
    }
    if extra_addresses:
        listener["additional_addresses"] = [{"address": socket_address(a, port)} for a in extra_addresses]
    return listener


def _string_action(chain: str) -> Json:
    return {"action": {"name": "chain", "typed_config": {"@type": _T + "google.protobuf.StringValue",
                                                         "value": chain}}}


def destination_chain_matcher(chains: Mapping[tuple[str, int], str]) -> Json:
    """A filter_chain_matcher: original destination IP (exact host range) → port (exact) → chain
    name, the way istiod's waypoint main_internal listener picks ``inbound-vip|<port>|...``."""
    by_ip: dict[str, dict[str, str]] = {}
    for (ip, port), chain in chains.items():
        by_ip.setdefault(str(ipaddress.ip_address(ip)), {})[str(int(port))] = chain
    range_matchers = []
    for ip, ports in by_ip.items():
        plen = 128 if ipaddress.ip_address(ip).version == 6 else 32
        range_matchers.append({
            "ranges": [{"address_prefix": ip, "prefix_len": plen}],
            "on_match": {"matcher": {"matcher_tree": {
                "input": _typed("port", _PORT_INPUT),
                "exact_match_map": {"map": {p: _string_action(c) for p, c in ports.items()}},
            }}},
        })
    return {"matcher_tree": {
        "input": _typed("ip", "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput"),
        "custom_match": _typed("ip-matcher", "xds.type.matcher.v3.IPMatcher", range_matchers=range_matchers),
    }}


def internal_listener(name: str, filter_chains: Sequence[Json],
                      chains: Mapping[tuple[str, int], str] | None = None,
                      listener_filters: Sequence[Json] | None = None) -> Json:
    """An internal listener (no socket) with the ``original_dst`` listener filter, so its local
    address is the original destination carried in filter state; `chains` maps
    (original ip, port) → chain name (see destination_chain_matcher)."""
    lf = list(listener_filters) if listener_filters is not None else [
        _typed("envoy.filters.listener.original_dst",
               "envoy.extensions.filters.listener.original_dst.v3.OriginalDst")]
    listener: Json = {"name": name, "internal_listener": {}, "listener_filters": lf,
                      "filter_chains": list(filter_chains)}
    if chains:
        listener["filter_chain_matcher"] = destination_chain_matcher(chains)
    return listener


def http_chain(name: str, cluster: str, stat_prefix: str | None = None) -> Json:
    """An HTTP/1.1 chain with an inline route (one virtual host, domains *) to `cluster`."""
    hcm = _typed(
        "envoy.filters.network.http_connection_manager",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix=stat_prefix or name,
        route_config={"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        http_filters=[_typed("envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router")],
    )
    return {"name": name, "filters": [hcm]}


def tcp_chain(name: str, cluster: str) -> Json:
    return {"name": name, "filters": [tcp_proxy(cluster, name)]}
