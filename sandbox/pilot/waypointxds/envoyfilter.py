"""EnvoyFilter patches applied to one waypoint's config, as istiod applies them.

Selection: the proxy's namespace or the root namespace; ``workloadSelector.labels`` a subset of
the proxy's labels; every ``configPatches[].match.proxy.proxyVersion`` a regex found in the
proxy's ISTIO_VERSION (an empty version never matches) and ``proxy.metadata`` exact.
Order: priority, root namespace first, creation time, name; patches in their written order.

Context: istiod 1.22–1.24 patches a waypoint's listeners as SIDECAR_INBOUND. The seed's
(ASM's) EnvoyFilters select waypoints with context GATEWAY, and in ASM they do take effect,
so the sandbox, standing in for ASM's control plane, lets ANY, SIDECAR_INBOUND and GATEWAY
patch a waypoint; SIDECAR_OUTBOUND only adds listeners (istiod's outbound pass). A CLUSTER ADD
with context ANY is skipped for waypoints, as in istiod (istio#49863).

Validation: each patch value must parse as the type ``applyTo`` names, and the whole config
must still encode after the filter is applied; otherwise the filter is skipped as a whole and
the reason is returned (the caller logs it and writes it to the filter's status).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from sandbox.pilot.waypointxds import encode
from sandbox.pilot.waypointxds import inputs as inp
from sandbox.pilot.waypointxds.build import Config

Json = dict[str, Any]
HCM = "envoy.filters.network.http_connection_manager"
_VALUE_TYPES = {
    "LISTENER": "envoy.config.listener.v3.Listener",
    "FILTER_CHAIN": "envoy.config.listener.v3.FilterChain",
    "NETWORK_FILTER": "envoy.config.listener.v3.Filter",
    "LISTENER_FILTER": "envoy.config.listener.v3.ListenerFilter",
    "HTTP_FILTER": "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
    "CLUSTER": "envoy.config.cluster.v3.Cluster",
    "ROUTE_CONFIGURATION": "envoy.config.route.v3.RouteConfiguration",
    "VIRTUAL_HOST": "envoy.config.route.v3.VirtualHost",
    "HTTP_ROUTE": "envoy.config.route.v3.Route",
}
_OPS = {
    "LISTENER": {"ADD", "REMOVE", "MERGE"},
    "FILTER_CHAIN": {"ADD", "REMOVE", "MERGE"},
    "NETWORK_FILTER": {"ADD", "REMOVE", "MERGE", "REPLACE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"},
    "HTTP_FILTER": {"ADD", "REMOVE", "MERGE", "REPLACE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"},
    "LISTENER_FILTER": {"ADD", "REMOVE", "MERGE", "REPLACE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"},
    "CLUSTER": {"ADD", "REMOVE", "MERGE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"},
    "ROUTE_CONFIGURATION": {"MERGE"},
    "VIRTUAL_HOST": {"ADD", "REMOVE", "MERGE"},
    "HTTP_ROUTE": {"ADD", "REMOVE", "MERGE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"},
}
WAYPOINT_CONTEXTS = {"ANY", "SIDECAR_INBOUND", "GATEWAY"}


class InvalidFilter(ValueError):
    pass


@dataclass
class Patch:
    apply_to: str
    op: str
    context: str
    match: Json
    value: Json | None


@dataclass
class ParsedFilter:
    key: tuple[str, str]
    priority: int
    created: str
    selector: dict[str, str] | None
    patches: list[Patch] = field(default_factory=list)


def canonical(type_name: str, value: Json) -> Json:
    """Round-trip through the proto: validates and turns camelCase into proto field names."""
    msg = encode.to_message("type.googleapis.com/" + type_name, value)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def parse(obj: Json) -> ParsedFilter:
    """Validate an EnvoyFilter object; raises InvalidFilter with a one-line reason."""
    md, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    key = (md.get("namespace", ""), md.get("name", ""))
    selector = None
    if spec.get("workloadSelector") is not None:
        selector = {str(k): str(v) for k, v in ((spec["workloadSelector"] or {}).get("labels") or {}).items()}
    pf = ParsedFilter(key, int(spec.get("priority") or 0), inp.created(obj), selector)
    for i, cp in enumerate(spec.get("configPatches") or []):
        where = f"configPatches[{i}]"
        apply_to = str(cp.get("applyTo") or "")
        patch = cp.get("patch") or {}
        op = str(patch.get("operation") or "")
        match = cp.get("match") or {}
        context = str(match.get("context") or "ANY")
        if apply_to not in _OPS:
            raise InvalidFilter(
                f"{where}: applyTo {apply_to or '(empty)'} is not supported by the sandbox pilot "
                f"(supported: {', '.join(sorted(_OPS))})"
            )
        if op not in _OPS[apply_to]:
            raise InvalidFilter(f"{where}: operation {op or '(empty)'} is not valid for {apply_to}")
        if context not in WAYPOINT_CONTEXTS | {"SIDECAR_OUTBOUND"}:
            raise InvalidFilter(f"{where}: unknown context {context}")
        pv = (match.get("proxy") or {}).get("proxyVersion")
        if pv:
            try:
                re.compile(pv)
            except re.error as e:
                raise InvalidFilter(f"{where}: proxyVersion {pv!r} is not a regex: {e}") from None
        if (
            apply_to == "NETWORK_FILTER"
            and op in ("REPLACE", "INSERT_BEFORE", "INSERT_AFTER")
            and not (((match.get("listener") or {}).get("filterChain") or {}).get("filter") or {}).get("name")
        ):
            raise InvalidFilter(f"{where}: {op} needs match.listener.filterChain.filter.name")
        value = patch.get("value")
        if op not in ("REMOVE",):
            if not isinstance(value, dict):
                raise InvalidFilter(f"{where}: patch.value is required for {op}")
            try:
                value = canonical(_VALUE_TYPES[apply_to], value)
            except encode.EncodeError as e:
                raise InvalidFilter(f"{where}: patch.value is not a valid {apply_to}: {e}") from None
        pf.patches.append(Patch(apply_to, op, context, match, value))
    return pf


def order(filters: list[ParsedFilter], root_namespace: str) -> list[ParsedFilter]:
    return sorted(filters, key=lambda f: (f.priority, f.key[0] != root_namespace, f.created, f.key[1]))


def selects(pf: ParsedFilter, proxy: inp.Proxy, root_namespace: str) -> bool:
    if pf.key[0] not in (proxy.namespace, root_namespace):
        return False
    if pf.selector is not None and any(proxy.labels.get(k) != v for k, v in pf.selector.items()):
        return False
    return True


def _proxy_matches(p: Patch, proxy: inp.Proxy) -> bool:
    pm = p.match.get("proxy") or {}
    if pm.get("proxyVersion") and not (
        proxy.istio_version and re.search(pm["proxyVersion"], proxy.istio_version)
    ):
        return False
    return True


# ---- merge -----------------------------------------------------------------------------------
def merge(dst: Json, src: Json) -> None:
    """proto Merge on JSON form: messages recurse, repeated fields append, scalars replace; an
    Any of another type replaces the whole value."""
    for k, v in src.items():
        cur = dst.get(k)
        if isinstance(v, dict) and isinstance(cur, dict):
            if cur.get("@type") != v.get("@type") and ("@type" in v or "@type" in cur):
                dst[k] = copy.deepcopy(v)
            else:
                merge(cur, v)
        elif isinstance(v, list) and isinstance(cur, list):
            cur.extend(copy.deepcopy(v))
        else:
            dst[k] = copy.deepcopy(v)


# ---- matching --------------------------------------------------------------------------------
def _listener_port(listener: Json) -> int | None:
    sa = (listener.get("address") or {}).get("socket_address") or {}
    return int(sa["port_value"]) if "port_value" in sa else None


def _listener_matches(lm: Json, listener: Json) -> bool:
    if lm.get("name") and lm["name"] != listener.get("name"):
        return False
    if lm.get("portNumber"):
        if "internal_listener" in listener or _listener_port(listener) != int(lm["portNumber"]):
            return False
    return True


def _chain_matches(cm: Json, chain: Json) -> bool:
    fcm = chain.get("filter_chain_match") or {}
    if cm.get("name") and cm["name"] != chain.get("name"):
        return False
    if cm.get("destinationPort") and int(fcm.get("destination_port") or 0) != int(cm["destinationPort"]):
        return False
    if cm.get("transportProtocol") and fcm.get("transport_protocol") != cm["transportProtocol"]:
        return False
    if cm.get("sni") and cm["sni"] not in (fcm.get("server_names") or []):
        return False
    if cm.get("applicationProtocols"):
        want = set(str(cm["applicationProtocols"]).split(","))
        if not want & set(fcm.get("application_protocols") or []):
            return False
    return True


def _chains(listener: Json) -> list[Json]:
    out = list(listener.get("filter_chains") or [])
    if listener.get("default_filter_chain"):
        out.append(listener["default_filter_chain"])
    return out


def _hcm(chain: Json) -> Json | None:
    for f in chain.get("filters") or []:
        if f.get("name") == HCM:
            return f.get("typed_config")
    return None


def _apply_list(items: list[Json], p: Patch, target: str | None) -> list[Json]:
    """NETWORK_FILTER / HTTP_FILTER / LISTENER_FILTER operations on one list."""
    if p.op == "ADD":
        return items + [copy.deepcopy(p.value)]
    if p.op == "INSERT_FIRST" or (p.op == "INSERT_BEFORE" and target is None):
        return [copy.deepcopy(p.value)] + items
    if p.op == "INSERT_AFTER" and target is None:
        return items + [copy.deepcopy(p.value)]
    idx = next((i for i, f in enumerate(items) if target is not None and f.get("name") == target), None)
    if idx is None:
        return items  # nothing to act on: a no-op, as in istiod
    if p.op == "REMOVE":
        return items[:idx] + items[idx + 1 :]
    if p.op == "REPLACE":
        return items[:idx] + [copy.deepcopy(p.value)] + items[idx + 1 :]
    if p.op == "MERGE":
        merged = copy.deepcopy(items[idx])
        merge(merged, p.value or {})
        return items[:idx] + [merged] + items[idx + 1 :]
    if p.op == "INSERT_BEFORE":
        return items[:idx] + [copy.deepcopy(p.value)] + items[idx:]
    if p.op == "INSERT_AFTER":
        return items[: idx + 1] + [copy.deepcopy(p.value)] + items[idx + 1 :]
    return items


def _patch_listeners(cfg: Config, p: Patch) -> None:
    lm = p.match.get("listener") or {}
    cm = lm.get("filterChain") or {}
    fm = cm.get("filter") or {}
    for li, listener in enumerate(list(cfg.listeners)):
        if not _listener_matches(lm, listener):
            continue
        if p.apply_to == "LISTENER":
            if p.op == "REMOVE":
                cfg.listeners.remove(listener)
            elif p.op == "MERGE":
                merge(cfg.listeners[li], p.value or {})
            continue
        if p.apply_to == "LISTENER_FILTER":
            target = lm.get("listenerFilter")
            listener["listener_filters"] = _apply_list(listener.get("listener_filters") or [], p, target)
            continue
        if p.apply_to == "FILTER_CHAIN":
            if p.op == "ADD":
                listener.setdefault("filter_chains", []).append(copy.deepcopy(p.value))
                continue
            keep = []
            for chain in listener.get("filter_chains") or []:
                if _chain_matches(cm, chain):
                    if p.op == "MERGE":
                        merge(chain, p.value or {})
                    else:
                        continue
                keep.append(chain)
            listener["filter_chains"] = keep
            continue
        for chain in _chains(listener):
            if not _chain_matches(cm, chain):
                continue
            if p.apply_to == "NETWORK_FILTER":
                if (
                    fm.get("name")
                    and not any(f.get("name") == fm["name"] for f in chain.get("filters") or [])
                    and p.op not in ("ADD", "INSERT_FIRST")
                ):
                    continue
                chain["filters"] = _apply_list(chain.get("filters") or [], p, fm.get("name"))
            elif p.apply_to == "HTTP_FILTER":
                if fm.get("name") and fm["name"] != HCM:
                    continue
                hcm = _hcm(chain)
                if hcm is None:
                    continue
                target = (fm.get("subFilter") or {}).get("name")
                hcm["http_filters"] = _apply_list(hcm.get("http_filters") or [], p, target)


def _cluster_matches(cm: Json, cluster: Json) -> bool:
    name = cluster.get("name") or ""
    if cm.get("name") and cm["name"] != name:
        return False
    parts = name.split("|")
    if len(parts) == 4:
        port, subset, host = parts[1], parts[2], parts[3]
        if parts[0] == "inbound-vip":
            subset = subset.split("/", 1)[1] if "/" in subset else ""
    else:
        port = subset = host = ""
    if cm.get("portNumber") and str(cm["portNumber"]) != port:
        return False
    if cm.get("service") and cm["service"] != host:
        return False
    if cm.get("subset") and cm["subset"] != subset:
        return False
    return True


def _patch_clusters(cfg: Config, p: Patch) -> None:
    cm = p.match.get("cluster") or {}
    if p.op in ("ADD", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST"):
        if p.context == "ANY":
            return  # istiod skips an ANY cluster ADD for inbound clusters (istio#49863)
        cfg.clusters.append(copy.deepcopy(p.value))
        return
    keep = []
    for cluster in cfg.clusters:
        if _cluster_matches(cm, cluster):
            if p.op == "REMOVE":
                continue
            merge(cluster, p.value or {})
        keep.append(cluster)
    cfg.clusters[:] = keep


def _route_configs(cfg: Config) -> list[Json]:
    """The waypoint's route configurations: inline in its HTTP chains (istiod inlines them too)."""
    out = []
    for listener in cfg.listeners:
        for chain in _chains(listener):
            hcm = _hcm(chain)
            if hcm is not None and isinstance(hcm.get("route_config"), dict):
                out.append(hcm["route_config"])
    return out


def _patch_routes(cfg: Config, p: Patch) -> None:
    """ROUTE_CONFIGURATION / VIRTUAL_HOST / HTTP_ROUTE on the inline route configs, matched by
    ``routeConfiguration.{name, portNumber, vhost.{name, route.{name}}}``."""
    rm = p.match.get("routeConfiguration") or {}
    vm = rm.get("vhost") or {}
    route_name = (vm.get("route") or {}).get("name")
    for rc in _route_configs(cfg):
        name = str(rc.get("name") or "")
        if rm.get("name") and rm["name"] != name:
            continue
        if rm.get("portNumber") and name.split("|")[1:2] != [str(rm["portNumber"])]:
            continue
        if p.apply_to == "ROUTE_CONFIGURATION":
            merge(rc, p.value or {})
            continue
        vhosts = rc.setdefault("virtual_hosts", [])
        if p.apply_to == "VIRTUAL_HOST":
            if p.op == "ADD":
                vhosts.append(copy.deepcopy(p.value))
                continue
            keep = []
            for vh in vhosts:
                if not vm.get("name") or vm["name"] == vh.get("name"):
                    if p.op == "REMOVE":
                        continue
                    merge(vh, p.value or {})
                keep.append(vh)
            rc["virtual_hosts"] = keep
            continue
        for vh in vhosts:
            if vm.get("name") and vm["name"] != vh.get("name"):
                continue
            vh["routes"] = _apply_list(vh.get("routes") or [], p, route_name)


def apply_one(cfg: Config, pf: ParsedFilter, proxy: inp.Proxy) -> None:
    """Existing resources are patched first; added listeners are appended afterwards."""
    added: list[Json] = []
    for p in pf.patches:
        if not _proxy_matches(p, proxy):
            continue
        if p.context == "SIDECAR_OUTBOUND" and not (p.apply_to == "LISTENER" and p.op == "ADD"):
            continue
        if p.apply_to == "LISTENER" and p.op == "ADD":
            added.append(copy.deepcopy(p.value))
        elif p.apply_to == "CLUSTER":
            _patch_clusters(cfg, p)
        elif p.apply_to in ("ROUTE_CONFIGURATION", "VIRTUAL_HOST", "HTTP_ROUTE"):
            _patch_routes(cfg, p)
        else:
            _patch_listeners(cfg, p)
    cfg.listeners.extend(added)


def validate(cfg: Config) -> None:
    for listener in cfg.listeners:
        encode.serialize(encode.LISTENER, listener)
    for cluster in cfg.clusters:
        encode.serialize(encode.CLUSTER, cluster)


def apply(
    cfg: Config, filters: list[ParsedFilter], proxy: inp.Proxy, root_namespace: str
) -> list[tuple[tuple[str, str], str]]:
    """Apply the selected filters in istiod's order; returns (filter key, reason) of those skipped
    because the patched config no longer encodes."""
    failures = []
    for pf in order([f for f in filters if selects(f, proxy, root_namespace)], root_namespace):
        saved = (copy.deepcopy(cfg.listeners), copy.deepcopy(cfg.clusters))
        try:
            apply_one(cfg, pf, proxy)
            validate(cfg)
        except (encode.EncodeError, ValueError, TypeError, KeyError) as e:
            cfg.listeners, cfg.clusters = saved
            failures.append((pf.key, f"patched config is invalid: {e}"))
    return failures
