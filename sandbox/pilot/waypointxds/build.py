"""One waypoint's listeners, clusters and endpoints (JSON form), shaped like istiod's.

- ``main_internal``: an internal listener (``original_dst`` + ``http_inspector``) whose chains
  are picked by the original destination VIP:port of a bound service; HTTP ports get an HTTP
  chain with an inline route config ``inbound-vip|<port>|http|<host>`` (routes from the
  VirtualService, else one default route), other ports a tcp_proxy, unknown protocols are sniffed.
- ``connect_originate``: istiod's HBONE originating internal listener (unused here, since the
  sandbox's pods do not speak HBONE, but present so EnvoyFilters that patch it apply).
- Clusters ``main_internal`` (internal address, internal_upstream transport),
  ``connect_originate``, and per bound port ``inbound-vip|<port>|http[/<subset>]|<host>`` /
  ``inbound-vip|<port>|tcp|<host>`` (EDS over ADS, plain TCP to ``podIP:targetPort``);
  ``outbound|<port>|<subset>|<host>`` for route destinations the waypoint does not serve.

Simplifications against istiod, same behaviour for the same objects: chains are chosen with
``filter_chain_match`` (not a ``filter_chain_matcher``); no RBAC/stats/peer-metadata filters;
connect_terminate (mTLS HBONE on :15008) is not built, since the sandbox has no workload
certificates and Kmesh never sends HBONE to a waypoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from sandbox.pilot.translate import hostname
from sandbox.pilot.waypointxds import inputs as inp

Json = dict[str, Any]
T = "type.googleapis.com/"
MAIN_INTERNAL = "main_internal"
CONNECT_ORIGINATE = "connect_originate"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
ADS = {"ads": {}, "resource_api_version": "V3"}


@dataclass
class Config:
    listeners: list[Json] = field(default_factory=list)
    clusters: list[Json] = field(default_factory=list)
    endpoints: dict[str, Json] = field(default_factory=dict)  # cluster name -> ClusterLoadAssignment
    bound_chains: list[Json] = field(default_factory=list)  # per bound VIP:port, for the entry listeners
    warnings: list[str] = field(default_factory=list)


def typed(name: str, type_name: str, **fields: Any) -> Json:
    return {"name": name, "typed_config": {"@type": T + type_name, **fields}}


def tcp_proxy(cluster: str, stat_prefix: str | None = None) -> Json:
    return typed(
        "envoy.filters.network.tcp_proxy",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        stat_prefix=stat_prefix or cluster,
        cluster=cluster,
    )


def cluster_name(direction: str, port: int, proto: str, subset: str, host: str) -> str:
    if direction == "inbound-vip":
        return f"inbound-vip|{port}|{proto}{'/' + subset if subset else ''}|{host}"
    return f"outbound|{port}|{subset}|{host}"


def _eds_cluster(name: str, lb: str = "ROUND_ROBIN") -> Json:
    return {
        "name": name,
        "type": "EDS",
        "connect_timeout": "10s",
        "lb_policy": lb,
        "eds_cluster_config": {"eds_config": ADS, "service_name": name},
        "common_lb_config": {},
    }


def _cla(name: str, eps: list[tuple[str, int]]) -> Json:
    lb = [
        {
            "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
            "health_status": "HEALTHY",
        }
        for ip, port in eps
    ]
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []}


def _lb_policy(policy: Json | None) -> str:
    simple = (((policy or {}).get("loadBalancer") or {}).get("simple") or "").upper()
    return {"LEAST_REQUEST": "LEAST_REQUEST", "LEAST_CONN": "LEAST_REQUEST", "RANDOM": "RANDOM"}.get(
        simple, "ROUND_ROBIN"
    )


def destination_rule(snap: inp.Snapshot, host: str, namespace: str) -> Json | None:
    """The DestinationRule for ``host``: the service namespace's first, then the root namespace's."""
    found = []
    for (ns, _), dr in snap.destinationrules.items():
        spec = dr.get("spec") or {}
        target = inp.service_by_host(snap, spec.get("host") or "", ns)
        if target is not None and hostname(target) == host and ns in (namespace, snap.root_namespace):
            found.append((ns != namespace, inp.created(dr), dr["metadata"]["name"], dr))
    return sorted(found, key=lambda t: t[:3])[0][3] if found else None


def virtual_service(snap: inp.Snapshot, host: str, namespace: str) -> Json | None:
    """The oldest VirtualService (mesh-bound) whose hosts name ``host``, in its namespace or the root one."""
    found = []
    for (ns, _), vs in snap.virtualservices.items():
        spec = vs.get("spec") or {}
        gateways = spec.get("gateways") or ["mesh"]
        if "mesh" not in gateways or ns not in (namespace, snap.root_namespace):
            continue
        for h in spec.get("hosts") or []:
            target = inp.service_by_host(snap, h, ns)
            if target is not None and hostname(target) == host:
                found.append((inp.created(vs), vs["metadata"]["name"], vs))
                break
    return sorted(found, key=lambda t: t[:2])[0][2] if found else None


class _Builder:
    def __init__(self, snap: inp.Snapshot, proxy: inp.Proxy) -> None:
        self.snap = snap
        self.proxy = proxy
        self.cfg = Config()
        self.bound = {hostname(s): s for s in inp.bound_services(snap, proxy)}
        self._clusters: dict[str, Json] = {}

    # ---- clusters -------------------------------------------------------------------------
    def _cluster(self, svc: Json, port: Json, proto: str, subset: str, direction: str) -> str:
        host = hostname(svc)
        name = cluster_name(direction, int(port["port"]), proto, subset, host)
        if name in self._clusters:
            return name
        dr = destination_rule(self.snap, host, svc["metadata"]["namespace"])
        spec = (dr or {}).get("spec") or {}
        labels: dict[str, str] = {}
        policy = spec.get("trafficPolicy")
        if subset:
            sub = next((s for s in spec.get("subsets") or [] if s.get("name") == subset), None)
            if sub is None:
                self.cfg.warnings.append(f"{host}: subset {subset!r} is not defined by a DestinationRule")
            else:
                labels = dict(sub.get("labels") or {})
                policy = sub.get("trafficPolicy") or policy
        self._clusters[name] = _eds_cluster(name, _lb_policy(policy))
        self.cfg.endpoints[name] = _cla(name, inp.endpoints(self.snap, svc, port, labels))
        return name

    def _subsets(self, svc: Json) -> list[str]:
        dr = destination_rule(self.snap, hostname(svc), svc["metadata"]["namespace"])
        return [s["name"] for s in ((dr or {}).get("spec") or {}).get("subsets") or [] if s.get("name")]

    # ---- routes ---------------------------------------------------------------------------
    def _destination(self, dest: Json, svc: Json, port: Json, vs_ns: str) -> str | None:
        target = inp.service_by_host(self.snap, dest.get("host") or "", vs_ns)
        if target is None:
            self.cfg.warnings.append(f"route destination {dest.get('host')!r} is not a known service")
            return None
        want = (dest.get("port") or {}).get("number")
        ports = (target.get("spec") or {}).get("ports") or []
        tport = next((p for p in ports if want and int(p["port"]) == int(want)), None)
        if tport is None:
            tport = next(
                (p for p in ports if int(p["port"]) == int(port["port"])), ports[0] if ports else None
            )
        if tport is None:
            return None
        direction = "inbound-vip" if hostname(target) in self.bound else "outbound"
        return self._cluster(target, tport, "http", dest.get("subset") or "", direction)

    @staticmethod
    def _string_match(m: Json) -> Json | None:
        if "exact" in m:
            return {"exact": m["exact"]}
        if "prefix" in m:
            return {"prefix": m["prefix"]}
        if "regex" in m:
            return {"safe_regex": {"regex": m["regex"]}}
        return None

    def _match(self, m: Json | None) -> Json:
        out: Json = {"prefix": "/"}
        m = m or {}
        uri = m.get("uri") or {}
        if "exact" in uri:
            out = {"path": uri["exact"]}
        elif "prefix" in uri:
            out = {"prefix": uri["prefix"]}
        elif "regex" in uri:
            out = {"safe_regex": {"regex": uri["regex"]}}
        if m.get("ignoreUriCase") and "safe_regex" not in out:
            out["case_sensitive"] = False
        headers = []
        for name, hm in sorted((m.get("headers") or {}).items()):
            sm = self._string_match(hm or {})
            headers.append(
                {"name": name, "string_match": sm} if sm else {"name": name, "present_match": True}
            )
        for name, hm in sorted((m.get("withoutHeaders") or {}).items()):
            sm = self._string_match(hm or {})
            headers.append(
                {"name": name, "string_match": sm, "invert_match": True}
                if sm
                else {"name": name, "present_match": True, "invert_match": True}
            )
        if m.get("method"):
            sm = self._string_match(m["method"])
            if sm:
                headers.append({"name": ":method", "string_match": sm})
        if headers:
            out["headers"] = headers
        qp = [
            {"name": k, "string_match": self._string_match(v) or {"exact": ""}}
            for k, v in sorted((m.get("queryParams") or {}).items())
        ]
        if qp:
            out["query_parameters"] = qp
        return out

    def _action(self, rule: Json, svc: Json, port: Json, vs_ns: str) -> Json | None:
        dests = []
        for d in rule.get("route") or []:
            name = self._destination(d.get("destination") or {}, svc, port, vs_ns)
            weight = int(d.get("weight", 100 if len(rule.get("route") or []) == 1 else 0))
            if name is not None and weight > 0:
                dests.append((name, weight))
        if not dests:
            return None
        action: Json
        if len(dests) == 1:
            action = {"cluster": dests[0][0]}
        else:
            action = {"weighted_clusters": {"clusters": [{"name": n, "weight": w} for n, w in dests]}}
        action["timeout"] = rule.get("timeout") or "0s"
        retries = rule.get("retries")
        if retries is not None:
            if int(retries.get("attempts", 0)) > 0:
                rp: Json = {
                    "num_retries": int(retries["attempts"]),
                    "retry_on": retries.get("retryOn") or DEFAULT_RETRY_ON,
                }
                if retries.get("perTryTimeout"):
                    rp["per_try_timeout"] = retries["perTryTimeout"]
                action["retry_policy"] = rp
        else:  # istiod's default policy
            action["retry_policy"] = {
                "num_retries": 2,
                "retry_on": DEFAULT_RETRY_ON,
                "retry_host_predicate": [
                    typed(
                        "envoy.retry_host_predicates.previous_hosts",
                        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
                    )
                ],
                "host_selection_retry_max_attempts": "5",
            }
        return action

    def _routes(self, svc: Json, port: Json, default_cluster: str) -> list[Json]:
        host = hostname(svc)
        vs = virtual_service(self.snap, host, svc["metadata"]["namespace"])
        routes: list[Json] = []
        if vs is not None:
            vs_ns = vs["metadata"]["namespace"]
            for i, rule in enumerate((vs.get("spec") or {}).get("http") or []):
                action = self._action(rule, svc, port, vs_ns)
                if action is None:
                    continue
                matches = [
                    m
                    for m in rule.get("match") or [None]
                    if m is None or not m.get("port") or int(m["port"]) == int(port["port"])
                ]
                for m in matches:
                    route = {
                        "name": rule.get("name") or f"{vs['metadata']['name']}.{vs_ns}.{i}",
                        "match": self._match(m),
                        "route": action,
                    }
                    routes.append(route)
        if not routes:
            routes.append(
                {
                    "name": "default",
                    "match": {"prefix": "/"},
                    "route": {"cluster": default_cluster, "timeout": "0s"},
                }
            )
        return routes

    # ---- chains ---------------------------------------------------------------------------
    def _http_chain(self, svc: Json, port: Json, vip_match: Json) -> Json:
        host, p = hostname(svc), int(port["port"])
        default = self._cluster(svc, port, "http", "", "inbound-vip")
        for subset in self._subsets(svc):
            self._cluster(svc, port, "http", subset, "inbound-vip")
        name = f"inbound-vip|{p}|http|{host}"
        hcm = typed(
            "envoy.filters.network.http_connection_manager",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=name,
            use_remote_address=False,
            normalize_path=True,
            server_header_transformation="PASS_THROUGH",
            # HTTP/1 header names as the application wrote them ("Server: 1", as the seed prints)
            http_protocol_options={"header_key_format": {"proper_case_words": {}}},
            route_config={
                "name": name,
                "validate_clusters": False,
                "virtual_hosts": [
                    {
                        "name": f"inbound|http|{p}",
                        "domains": ["*"],
                        "routes": self._routes(svc, port, default),
                    }
                ],
            },
            http_filters=[
                typed("envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router")
            ],
        )
        return {"name": name, "filter_chain_match": vip_match, "filters": [hcm]}

    def _tcp_chain(self, svc: Json, port: Json, vip_match: Json) -> Json:
        host, p = hostname(svc), int(port["port"])
        cluster = self._cluster(svc, port, "tcp", "", "inbound-vip")
        name = f"inbound-vip|{p}|tcp|{host}"
        return {"name": name, "filter_chain_match": vip_match, "filters": [tcp_proxy(cluster, name)]}

    def build(self) -> Config:
        chains: list[Json] = []
        for svc in self.bound.values():
            for port in (svc.get("spec") or {}).get("ports") or []:
                if (port.get("protocol") or "TCP") != "TCP":
                    continue
                p = int(port["port"])
                ranges = [
                    {"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32} for ip in inp.vips(svc)
                ]
                match = {"prefix_ranges": ranges, "destination_port": p}
                proto = inp.port_protocol(port)
                if proto == "http":
                    chains.append(self._http_chain(svc, port, match))
                elif proto == "tcp":
                    chains.append(self._tcp_chain(svc, port, match))
                else:  # sniffed: HTTP when http_inspector says so, TCP otherwise
                    chains.append(
                        self._http_chain(svc, port, {**match, "application_protocols": ["http/1.1", "h2c"]})
                    )
                    chains.append(self._tcp_chain(svc, port, match))
        # the entry listeners (kmesh-listener, the PROXY binding) carry the same chains; see binding.py
        self.cfg.bound_chains = copy.deepcopy(chains)
        self.cfg.listeners = [
            {
                "name": MAIN_INTERNAL,
                "internal_listener": {},
                "traffic_direction": "INBOUND",
                "listener_filters": [
                    typed(
                        "envoy.filters.listener.original_dst",
                        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
                    ),
                    typed(
                        "envoy.filters.listener.http_inspector",
                        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
                    ),
                ],
                "listener_filters_timeout": "1s",
                "continue_on_listener_filters_timeout": True,
                "filter_chains": chains,
            },
            {
                "name": CONNECT_ORIGINATE,
                "internal_listener": {},
                "traffic_direction": "OUTBOUND",
                "listener_filters": [
                    typed(
                        "envoy.filters.listener.original_dst",
                        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
                    )
                ],
                "filter_chains": [
                    {
                        "name": CONNECT_ORIGINATE,
                        "filters": [
                            typed(
                                "envoy.filters.network.tcp_proxy",
                                "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                stat_prefix=CONNECT_ORIGINATE,
                                cluster=CONNECT_ORIGINATE,
                                tunneling_config={"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                            )
                        ],
                    }
                ],
            },
        ]
        self.cfg.clusters = [
            {
                "name": MAIN_INTERNAL,
                "type": "STATIC",
                "connect_timeout": "10s",
                "load_assignment": {
                    "cluster_name": MAIN_INTERNAL,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "envoy_internal_address": {"server_listener_name": MAIN_INTERNAL}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
                "transport_socket": typed(
                    "envoy.transport_sockets.internal_upstream",
                    "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
                    transport_socket=typed(
                        "envoy.transport_sockets.raw_buffer",
                        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
                    ),
                ),
            },
            {
                "name": CONNECT_ORIGINATE,
                "type": "ORIGINAL_DST",
                "lb_policy": "CLUSTER_PROVIDED",
                "connect_timeout": "10s",
                "original_dst_lb_config": {"upstream_port_override": 15008},
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
            },
            *self._clusters.values(),
        ]
        return self.cfg


def build(snap: inp.Snapshot, proxy: inp.Proxy) -> Config:
    """The waypoint config for ``proxy`` before EnvoyFilters and the entry bindings."""
    return _Builder(snap, proxy).build()
