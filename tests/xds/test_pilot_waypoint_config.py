"""The waypoint config the pilot computes, without Envoy: routes from VirtualServices, clusters
from DestinationRules, which services a waypoint serves, and EnvoyFilter semantics (selection,
order, operations, validation). Every resource produced must encode as its Envoy proto."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox.pilot.waypointxds import build, encode, envoyfilter
from sandbox.pilot.waypointxds import inputs as inp

REPO = Path(__file__).resolve().parents[2]
HOST = "fortio.default.svc.cluster.local"
WP_LABELS = {
    "gateway.istio.io/managed": "istio.io-mesh-controller",
    "gateway.networking.k8s.io/gateway-name": "waypoint",
}


def _svc(
    name: str,
    ns: str = "default",
    ip: str = "10.96.0.10",
    labels: dict | None = None,
    ports: list | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {
            "selector": {"app": name},
            "clusterIP": ip,
            "ports": ports or [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def _pod(name: str, app: str, version: str, ip: str, ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app, "version": version}},
        "spec": {"containers": [{"name": "c", "ports": [{"name": "web", "containerPort": 9090}]}]},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


@pytest.fixture
def snap() -> inp.Snapshot:
    s = inp.Snapshot()
    s.namespaces["default"] = {
        "metadata": {"name": "default", "labels": {"istio.io/use-waypoint": "waypoint"}}
    }
    s.services[("default", "fortio")] = _svc("fortio")
    s.services[("default", "waypoint")] = _svc(
        "waypoint", ip="10.96.0.99", ports=[{"name": "mesh", "port": 15008}]
    )
    s.pods[("default", "f1")] = _pod("f1", "fortio", "v1", "10.244.0.2")
    s.pods[("default", "f2")] = _pod("f2", "fortio", "v2", "10.244.0.3")
    s.pods[("default", "f3")] = _pod("f3", "fortio", "v2", "10.244.0.4", ready=False)
    for d in yaml.safe_load_all((REPO / "manifests/samples/fortio/fortio-route.yaml").read_text()):
        if d["kind"] == "VirtualService":
            s.virtualservices[("default", "fortio")] = d
        elif d["kind"] == "DestinationRule":
            s.destinationrules[("default", "fortio")] = d
    return s


@pytest.fixture
def proxy() -> inp.Proxy:
    return inp.parse_proxy(
        "waypoint~10.244.0.9~waypoint-5d-x.default~default.svc.cluster.local",
        {"LABELS": WP_LABELS, "ISTIO_VERSION": "1.22.6"},
    )


def _encode_all(cfg: build.Config) -> None:
    for lst in cfg.listeners:
        encode.serialize(encode.LISTENER, lst)
    for c in cfg.clusters:
        encode.serialize(encode.CLUSTER, c)
    for cla in cfg.endpoints.values():
        encode.serialize(encode.ENDPOINT, cla)


def _routes(cfg: build.Config, port: int = 80, host: str = HOST) -> list[dict]:
    main = next(x for x in cfg.listeners if x["name"] == "main_internal")
    chain = next(c for c in main["filter_chains"] if c["name"] == f"inbound-vip|{port}|http|{host}")
    return chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]


def test_seed_route_is_weighted_over_subset_clusters_with_ready_endpoints(snap, proxy) -> None:
    cfg = build.build(snap, proxy)
    _encode_all(cfg)
    [route] = _routes(cfg)
    assert route["route"]["weighted_clusters"]["clusters"] == [
        {"name": f"inbound-vip|80|http/v1|{HOST}", "weight": 90},
        {"name": f"inbound-vip|80|http/v2|{HOST}", "weight": 10},
    ]
    eps = cfg.endpoints[f"inbound-vip|80|http/v2|{HOST}"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in eps] == [
        {"address": "10.244.0.3", "port_value": 8080}
    ]  # f3 is not Ready
    assert len(cfg.endpoints[f"inbound-vip|80|http|{HOST}"]["endpoints"][0]["lb_endpoints"]) == 2
    # the waypoint's own Service is never bound to itself
    assert not any("waypoint.default" in c["name"] for c in cfg.clusters)


def test_matches_timeout_retries_and_named_target_port(snap, proxy) -> None:
    snap.services[("default", "fortio")]["spec"]["ports"][0]["targetPort"] = "web"
    snap.virtualservices[("default", "fortio")]["spec"]["http"] = [
        {
            "name": "hdr",
            "match": [
                {"headers": {"x-version": {"exact": "v2"}}, "uri": {"prefix": "/api"}},
                {"uri": {"regex": "^/v2/.*"}},
            ],
            "route": [{"destination": {"host": "fortio", "subset": "v2"}}],
            "timeout": "3s",
            "retries": {"attempts": 4, "perTryTimeout": "1s", "retryOn": "5xx"},
        },
        {
            "match": [{"uri": {"exact": "/only"}}],
            "route": [
                {"destination": {"host": "fortio", "subset": "v1"}, "weight": 100},
                {"destination": {"host": "fortio", "subset": "v2"}, "weight": 0},
            ],
        },
    ]
    cfg = build.build(snap, proxy)
    _encode_all(cfg)
    r = _routes(cfg)
    assert r[0]["match"] == {
        "prefix": "/api",
        "headers": [{"name": "x-version", "string_match": {"exact": "v2"}}],
    }
    assert r[1]["match"] == {"safe_regex": {"regex": "^/v2/.*"}}
    assert r[0]["route"]["cluster"] == f"inbound-vip|80|http/v2|{HOST}" and r[0]["route"]["timeout"] == "3s"
    assert r[0]["route"]["retry_policy"] == {"num_retries": 4, "retry_on": "5xx", "per_try_timeout": "1s"}
    assert r[2]["match"] == {"path": "/only"} and r[2]["route"]["cluster"] == f"inbound-vip|80|http/v1|{HOST}"
    eps = cfg.endpoints[f"inbound-vip|80|http/v1|{HOST}"]["endpoints"][0]["lb_endpoints"]
    assert eps[0]["endpoint"]["address"]["socket_address"]["port_value"] == 9090


def test_no_virtualservice_is_one_default_route_and_tcp_ports_get_tcp_chains(snap, proxy) -> None:
    snap.virtualservices.clear()
    snap.services[("default", "db")] = _svc("db", ip="10.96.0.11", ports=[{"name": "tcp-db", "port": 5432}])
    cfg = build.build(snap, proxy)
    _encode_all(cfg)
    [route] = _routes(cfg)
    assert route["route"]["cluster"] == f"inbound-vip|80|http|{HOST}"
    main = next(x for x in cfg.listeners if x["name"] == "main_internal")
    tcp = next(
        c for c in main["filter_chains"] if c["name"] == "inbound-vip|5432|tcp|db.default.svc.cluster.local"
    )
    assert tcp["filter_chain_match"] == {
        "prefix_ranges": [{"address_prefix": "10.96.0.11", "prefix_len": 32}],
        "destination_port": 5432,
    }


def test_bound_services_follow_use_waypoint_labels(snap, proxy) -> None:
    snap.services[("default", "opt-out")] = _svc(
        "opt-out", ip="10.96.0.12", labels={"istio.io/use-waypoint": "none"}
    )
    snap.services[("other", "remote")] = _svc(
        "remote",
        "other",
        ip="10.96.0.13",
        labels={"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "default"},
    )
    snap.services[("other", "elsewhere")] = _svc(
        "elsewhere", "other", ip="10.96.0.14", labels={"istio.io/use-waypoint": "waypoint"}
    )
    names = [s["metadata"]["name"] for s in inp.bound_services(snap, proxy)]
    assert names == ["fortio", "remote"]
    snap.gateways[("default", "waypoint")] = {
        "metadata": {
            "name": "waypoint",
            "namespace": "default",
            "labels": {"istio.io/waypoint-for": "workload"},
        }
    }
    assert inp.bound_services(snap, proxy) == []


# ---- EnvoyFilters ---------------------------------------------------------------------------------
def _seed_filters() -> list[envoyfilter.ParsedFilter]:
    return [
        envoyfilter.parse(d)
        for d in yaml.safe_load_all((REPO / "manifests/envoyfilters/waypoint.yaml").read_text())
    ]


def _ef(
    name: str,
    patches: list[dict],
    ns: str = "istio-system",
    selector: dict | None = None,
    created: str = "2026-01-01T00:00:00Z",
    priority: int = 0,
) -> dict:
    spec: dict[str, Any] = {"configPatches": patches, "priority": priority}
    if selector is not None:
        spec["workloadSelector"] = {"labels": selector}
    return {"metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": spec}


def test_seed_filters_add_listener_cluster_and_skip_tunneling(snap, proxy) -> None:
    cfg = build.build(snap, proxy)
    assert envoyfilter.apply(cfg, _seed_filters(), proxy, "istio-system") == []
    names = [x["name"] for x in cfg.listeners]
    assert names[-1] == "kmesh-listener"  # ADDed listeners come after the patched ones
    co = next(x for x in cfg.listeners if x["name"] == "connect_originate")
    tp = co["filter_chains"][0]["filters"][0]["typed_config"]
    assert tp["cluster"] == "kmesh_original_dst_cluster" and "tunneling_config" not in tp
    odc = next(c for c in cfg.clusters if c["name"] == "kmesh_original_dst_cluster")
    assert odc["type"] == "ORIGINAL_DST" and odc["lb_policy"] == "CLUSTER_PROVIDED"


def test_filters_need_matching_labels_and_namespace(snap, proxy) -> None:
    other = inp.Proxy(proxy.node_id, proxy.ip, proxy.pod, "default", {"app": "not-a-waypoint"}, "1.22.6")
    cfg = build.build(snap, other)
    envoyfilter.apply(cfg, _seed_filters(), other, "istio-system")
    assert "kmesh-listener" not in [x["name"] for x in cfg.listeners]
    pf = envoyfilter.parse(_ef("x", [], ns="elsewhere"))
    assert not envoyfilter.selects(pf, proxy, "istio-system")


def test_order_root_namespace_first_then_creation_and_priority(snap, proxy) -> None:
    def add(name: str) -> dict:
        return {
            "applyTo": "LISTENER",
            "match": {"context": "SIDECAR_INBOUND"},
            "patch": {
                "operation": "ADD",
                "value": {
                    "name": name,
                    "address": {"socket_address": {"address": "0.0.0.0", "port_value": 1}},
                },
            },
        }

    filters = [
        envoyfilter.parse(f)
        for f in (
            _ef("late-root", [add("b")], created="2026-02-01T00:00:00Z"),
            _ef("early-local", [add("c")], ns="default", created="2026-01-01T00:00:00Z"),
            _ef("early-root", [add("a")], created="2026-01-01T00:00:00Z"),
            _ef("first", [add("z")], ns="default", priority=-1),
        )
    ]
    cfg = build.build(snap, proxy)
    envoyfilter.apply(cfg, filters, proxy, "istio-system")
    assert [x["name"] for x in cfg.listeners][-4:] == ["z", "a", "b", "c"]


def test_network_and_http_filter_operations(snap, proxy) -> None:
    hcm_match = {
        "context": "SIDECAR_INBOUND",
        "listener": {
            "name": "main_internal",
            "filterChain": {
                "filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"},
                }
            },
        },
    }
    fault = {
        "name": "envoy.filters.http.fault",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"},
    }
    cors = {
        "name": "envoy.filters.http.cors",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
    }
    merge = {
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
            ".v3.HttpConnectionManager",
            "stat_prefix": "patched",
        }
    }
    pf = envoyfilter.parse(
        _ef(
            "ops",
            [
                {
                    "applyTo": "HTTP_FILTER",
                    "match": hcm_match,
                    "patch": {"operation": "INSERT_BEFORE", "value": fault},
                },
                {
                    "applyTo": "HTTP_FILTER",
                    "match": hcm_match,
                    "patch": {"operation": "INSERT_FIRST", "value": cors},
                },
                {
                    "applyTo": "NETWORK_FILTER",
                    "match": {
                        "listener": {
                            "filterChain": {
                                "filter": {"name": "envoy.filters.network.http_connection_manager"}
                            }
                        }
                    },
                    "patch": {"operation": "MERGE", "value": merge},
                },
                {
                    "applyTo": "HTTP_FILTER",
                    "match": {
                        "listener": {
                            "filterChain": {
                                "filter": {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "subFilter": {"name": "envoy.filters.http.cors"},
                                }
                            }
                        }
                    },
                    "patch": {"operation": "REMOVE"},
                },
            ],
        )
    )
    cfg = build.build(snap, proxy)
    assert envoyfilter.apply(cfg, [pf], proxy, "istio-system") == []
    main = next(x for x in cfg.listeners if x["name"] == "main_internal")
    hcm = main["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    assert hcm["stat_prefix"] == "patched"
    _encode_all(cfg)


def test_cluster_merge_remove_and_any_add_skipped(snap, proxy) -> None:
    pf = envoyfilter.parse(
        _ef(
            "c",
            [
                {
                    "applyTo": "CLUSTER",
                    "match": {"cluster": {"subset": "v1", "service": HOST}},
                    "patch": {"operation": "MERGE", "value": {"connect_timeout": "1.500s"}},
                },
                {
                    "applyTo": "CLUSTER",
                    "match": {"cluster": {"name": f"inbound-vip|80|http/v2|{HOST}"}},
                    "patch": {"operation": "REMOVE"},
                },
                {
                    "applyTo": "CLUSTER",
                    "match": {"context": "ANY"},
                    "patch": {"operation": "ADD", "value": {"name": "any-added", "type": "STATIC"}},
                },
            ],
        )
    )
    cfg = build.build(snap, proxy)
    envoyfilter.apply(cfg, [pf], proxy, "istio-system")
    by_name = {c["name"]: c for c in cfg.clusters}
    assert by_name[f"inbound-vip|80|http/v1|{HOST}"]["connect_timeout"] == "1.500s"
    assert f"inbound-vip|80|http/v2|{HOST}" not in by_name and "any-added" not in by_name


def test_proxy_version_is_a_regex_on_istio_version(snap, proxy) -> None:
    patch = {
        "applyTo": "CLUSTER",
        "match": {"context": "SIDECAR_INBOUND", "proxy": {"proxyVersion": "^1\\.22.*"}},
        "patch": {"operation": "ADD", "value": {"name": "v122", "type": "STATIC"}},
    }
    pf = envoyfilter.parse(_ef("v", [patch]))
    cfg = build.build(snap, proxy)
    envoyfilter.apply(cfg, [pf], proxy, "istio-system")
    assert "v122" in [c["name"] for c in cfg.clusters]
    unversioned = copy.copy(proxy)
    unversioned.istio_version = ""
    cfg = build.build(snap, unversioned)
    envoyfilter.apply(cfg, [pf], unversioned, "istio-system")
    assert "v122" not in [c["name"] for c in cfg.clusters]


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"applyTo": "VIRTUAL_CLUSTER", "patch": {"operation": "ADD", "value": {}}}, "not supported"),
        ({"applyTo": "CLUSTER", "patch": {"operation": "REPLACE", "value": {}}}, "not valid for CLUSTER"),
        (
            {"applyTo": "CLUSTER", "patch": {"operation": "ADD", "value": {"name": "x", "type": "NOPE"}}},
            "not a valid",
        ),
        (
            {"applyTo": "NETWORK_FILTER", "patch": {"operation": "REPLACE", "value": {"name": "x"}}},
            "filter.name",
        ),
        ({"applyTo": "LISTENER", "patch": {"operation": "ADD"}}, "patch.value is required"),
    ],
)
def test_invalid_filters_are_rejected_with_a_reason(patch: dict, reason: str) -> None:
    with pytest.raises(envoyfilter.InvalidFilter, match=reason):
        envoyfilter.parse(_ef("bad", [patch]))


def test_inbound_binding_from_gateway_or_class(snap, proxy) -> None:
    from sandbox.pilot.waypointxds import binding

    gw = {
        "metadata": {"name": "waypoint", "namespace": "default", "annotations": {}},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    snap.gateways[("default", "waypoint")] = gw
    snap.gatewayclasses["istio-waypoint"] = {
        "metadata": {
            "name": "istio-waypoint",
            "annotations": {"ambient.istio.io/waypoint-inbound-binding": "PROXY/15088"},
        }
    }

    def proxy_listeners() -> dict[int, str]:
        cfg = build.build(snap, proxy)
        binding.render(cfg, snap, proxy)
        _encode_all(cfg)
        return {
            x["address"]["socket_address"]["port_value"]: x["name"]
            for x in cfg.listeners
            if x["name"].startswith("proxy_protocol_inbound")
        }

    assert proxy_listeners() == {15088: "proxy_protocol_inbound"}  # the class's annotation
    gw["metadata"]["annotations"]["ambient.istio.io/waypoint-inbound-binding"] = "PROXY"
    assert proxy_listeners() == {80: "proxy_protocol_inbound_80"}  # no port: the original port
    gw["metadata"]["annotations"]["ambient.istio.io/waypoint-inbound-binding"] = "NONE"
    snap.gatewayclasses.clear()
    assert proxy_listeners() == {}


def test_kmesh_tlv_is_rendered_as_the_dynamic_module_with_entry_chains(snap, proxy) -> None:
    from sandbox.pilot.waypointxds import binding

    cfg = build.build(snap, proxy)
    envoyfilter.apply(cfg, _seed_filters(), proxy, "istio-system")
    binding.render(cfg, snap, proxy)
    _encode_all(cfg)
    kl = next(x for x in cfg.listeners if x["name"] == "kmesh-listener")
    names = [f["name"] for f in kl["listener_filters"]]
    assert "envoy.listener.kmesh_tlv" not in names and names[0] == "kmesh_tlv"
    assert names[1] == "envoy.filters.listener.set_filter_state"
    first, *_, last = kl["filter_chains"]
    assert first["filter_chain_match"]["destination_port"] == 80
    assert first["name"] == f"inbound-vip|80|http|{HOST}"  # the service's own HTTP chain and routes
    assert "weighted_clusters" in json.dumps(first)
    assert last["filters"][0]["typed_config"]["cluster"] == "kmesh_original_dst_cluster"  # everything else


def test_route_patches_apply_to_the_inline_route_configs(snap, proxy) -> None:
    rc = {"portNumber": 80, "vhost": {"name": "inbound|http|80"}}
    pf = envoyfilter.parse(
        _ef(
            "routes",
            [
                {
                    "applyTo": "HTTP_ROUTE",
                    "match": {"routeConfiguration": rc},
                    "patch": {
                        "operation": "INSERT_FIRST",
                        "value": {
                            "name": "health",
                            "match": {"path": "/healthz"},
                            "direct_response": {"status": 204},
                        },
                    },
                },
                {
                    "applyTo": "VIRTUAL_HOST",
                    "match": {"routeConfiguration": rc},
                    "patch": {
                        "operation": "MERGE",
                        "value": {
                            "request_headers_to_add": [{"header": {"key": "x-waypoint", "value": "yes"}}]
                        },
                    },
                },
                {
                    "applyTo": "ROUTE_CONFIGURATION",
                    "match": {"routeConfiguration": {"portNumber": 81}},
                    "patch": {"operation": "MERGE", "value": {"validate_clusters": True}},
                },
            ],
        )
    )
    cfg = build.build(snap, proxy)
    assert envoyfilter.apply(cfg, [pf], proxy, "istio-system") == []
    _encode_all(cfg)
    main = next(x for x in cfg.listeners if x["name"] == "main_internal")
    hcm = next(c for c in main["filter_chains"] if c["name"] == f"inbound-vip|80|http|{HOST}")["filters"][0]
    route_config = hcm["typed_config"]["route_config"]
    vh = route_config["virtual_hosts"][0]
    assert [r.get("name") for r in vh["routes"]][0] == "health"
    assert vh["request_headers_to_add"][0]["header"]["key"] == "x-waypoint"
    assert route_config["validate_clusters"] is False  # port 81 matched nothing
