"""How connections enter the sandbox's waypoint: Kmesh's TLV on :15019, or PROXY protocol.

Kmesh's waypoint image knows ``envoy.listener.kmesh_tlv``; the sandbox's waypoint is stock
Envoy 1.40, which would NACK the listener (kmesh#678). So every listener filter of that name
(or whose TypedStruct names the ``KmeshTlv`` type) is rendered as this project's ``kmesh_tlv``
dynamic module followed by Envoy's ``set_filter_state`` (``waypoint.envoycfg``): the module
strips the TLV and restores the original VIP:port as the local address, the second filter
shares it with the upstream connection, as connect_terminate does for HBONE.

Such a listener then carries, ahead of the EnvoyFilter's own chains, the service chains of
``main_internal`` (HTTP with the VirtualService's routes, or TCP), matched on the restored
VIP:port; every other destination still takes the EnvoyFilter's chain (tcp_proxy to
``kmesh_original_dst_cluster``). Without them the restored connection would bypass the
VirtualService. istiod reaches these chains through ``main_internal`` (connect_terminate ->
internal listener); here they sit on the entry listener itself, because Envoy 1.40 loses a
response on that internal hop when the server closes right after it (``Connection: close``):
measured 55 of 60 answered through ``main_internal``, 60 of 60 direct. ``main_internal`` stays,
for HBONE parity and for EnvoyFilters that patch it.

``ambient.istio.io/waypoint-inbound-binding: PROXY/<port>`` on the Gateway or its GatewayClass
adds listener ``proxy_protocol_inbound`` on that port with Envoy's ``proxy_protocol`` listener
filter and the same chains (istiod's "sandwich" binding; the sender is the Kmesh daemon here).
``PROXY`` without a port means the sender keeps the original destination port (workload xDS
``application_tunnel`` port 0): one such listener per port the waypoint serves.
"""

from __future__ import annotations

import copy
from typing import Any

from sandbox.pilot.waypointxds import inputs as inp
from sandbox.pilot.waypointxds.build import Config, tcp_proxy, typed

Json = dict[str, Any]
KMESH_TLV_NAME = "envoy.listener.kmesh_tlv"
KMESH_TLV_TYPE = "KmeshTlv"
ORIGINAL_DST_CLUSTER = "kmesh_original_dst_cluster"
PROXY_LISTENER = "proxy_protocol_inbound"


def is_kmesh_tlv(lf: Json) -> bool:
    if lf.get("name") == KMESH_TLV_NAME:
        return True
    tc = lf.get("typed_config") or {}
    inner = str(tc.get("type_url") or tc.get("@type") or "")
    return inner.endswith("." + KMESH_TLV_TYPE)


def kmesh_tlv_fields() -> Json:
    """listener_filters, socket_options (TCP_DEFER_ACCEPT) and the backstop timeout of the module."""
    from waypoint.envoycfg import kmesh_tlv_listener_fields

    return kmesh_tlv_listener_fields()


def defer_accept() -> Json:
    from waypoint.envoycfg import defer_accept_option

    return defer_accept_option()


def share_original_dst() -> Json:
    from waypoint.envoycfg import share_original_dst_filter

    return share_original_dst_filter()


def inbound_binding(snap: inp.Snapshot, proxy: inp.Proxy) -> tuple[str, int] | None:
    """("PROXY", port) from the Gateway's annotation, else its GatewayClass's; None otherwise."""
    gw = snap.gateways.get((proxy.namespace, proxy.gateway)) or {}
    value = inp.annotations_of(gw).get(inp.INBOUND_BINDING)
    if value is None:
        cls = snap.gatewayclasses.get(str((gw.get("spec") or {}).get("gatewayClassName") or ""))
        value = inp.annotations_of(cls or {}).get(inp.INBOUND_BINDING)
    if not value:
        return None
    proto, _, port = value.partition("/")
    if proto.upper() != "PROXY":
        return None
    return "PROXY", int(port) if port.isdigit() else 0


def _fallback(cfg: Config) -> list[Json]:
    if any(c.get("name") == ORIGINAL_DST_CLUSTER for c in cfg.clusters):
        return [{"name": "kmesh-original-dst", "filters": [tcp_proxy(ORIGINAL_DST_CLUSTER)]}]
    return []


def render(cfg: Config, snap: inp.Snapshot, proxy: inp.Proxy) -> None:
    """Rewrite kmesh_tlv listener filters and add the entry bindings (see module doc)."""
    for listener in cfg.listeners:
        lfs = listener.get("listener_filters") or []
        if not any(is_kmesh_tlv(lf) for lf in lfs):
            continue
        fields = kmesh_tlv_fields()
        out: list[Json] = []
        for lf in lfs:
            out.extend(fields["listener_filters"] if is_kmesh_tlv(lf) else [lf])
        listener["listener_filters"] = out
        listener.setdefault("listener_filters_timeout", fields["listener_filters_timeout"])
        listener["socket_options"] = list(listener.get("socket_options") or []) + fields["socket_options"]
        listener["filter_chains"] = copy.deepcopy(cfg.bound_chains) + list(
            listener.get("filter_chains") or []
        )
    binding = inbound_binding(snap, proxy)
    if binding is None:
        return
    _, port = binding
    # PROXY without a port: the sender connects to the original destination port (istio's
    # application_tunnel port 0), so there is one listener per port the waypoint serves
    ports = (
        [port]
        if port
        else sorted({int(c["filter_chain_match"]["destination_port"]) for c in cfg.bound_chains})
    )
    taken = {
        int(((x.get("address") or {}).get("socket_address") or {}).get("port_value", 0))
        for x in cfg.listeners
    }
    for p in ports:
        if p in taken:
            continue
        chains = copy.deepcopy(cfg.bound_chains) + _fallback(cfg)
        if not chains:
            continue  # nothing to serve yet; Envoy refuses a listener without chains
        cfg.listeners.append(
            {
                "name": PROXY_LISTENER if port else f"{PROXY_LISTENER}_{p}",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": p}},
                "socket_options": [defer_accept()],  # as for kmesh_tlv: the header is there at accept
                "listener_filters": [
                    typed(
                        "envoy.filters.listener.proxy_protocol",
                        "envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol",
                        stat_prefix="waypoint_inbound",
                    ),
                    share_original_dst(),
                    typed(
                        "envoy.filters.listener.http_inspector",
                        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
                    ),
                ],
                "filter_chains": chains,
            }
        )
