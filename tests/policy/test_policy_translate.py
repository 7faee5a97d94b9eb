"""AuthorizationPolicy -> istio.security.Authorization, the pilot's pure conversion (no servers)."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.xds.dump import policy_json
from daemon.xds.gen.istio.security import authorization_pb2 as az
from sandbox.pilot import authz


def ap(spec: dict[str, Any], ns: str = "shop", name: str = "p", **md: Any) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns, **md}, "spec": spec}


def as_json(spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
    converted = authz.convert(ap(spec, **kw))
    assert converted.policy is not None, converted.warnings
    return policy_json(converted.policy)


@pytest.mark.parametrize(("ns", "spec", "scope"), [
    ("shop", {}, "Namespace"),
    ("istio-system", {}, "Global"),
    ("shop", {"selector": {"matchLabels": {"app": "a"}}}, "WorkloadSelector"),
    ("istio-system", {"selector": {"matchLabels": {"app": "a"}}}, "WorkloadSelector"),
    ("shop", {"selector": {}}, "WorkloadSelector"),
])
def test_scope(ns: str, spec: dict[str, Any], scope: str) -> None:
    assert as_json(spec, ns=ns)["scope"] == scope


def test_root_namespace_is_configurable() -> None:
    pol = authz.convert(ap({}, ns="mesh-root"), root_namespace="mesh-root").policy
    assert pol is not None and pol.scope == az.GLOBAL
    assert authz.convert(ap({}, ns="istio-system"), root_namespace="mesh-root").policy.scope == az.NAMESPACE


@pytest.mark.parametrize(("action", "want"), [(None, "Allow"), ("ALLOW", "Allow"), ("DENY", "Deny")])
def test_action(action: str | None, want: str) -> None:
    spec = {} if action is None else {"action": action}
    assert as_json(spec)["action"] == want


@pytest.mark.parametrize("spec", [
    {"action": "AUDIT"},
    {"action": "CUSTOM", "provider": {"name": "ext"}},
    {"targetRefs": [{"kind": "Service", "group": "", "name": "echo"}]},
    {"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}},
])
def test_not_for_ztunnel(spec: dict[str, Any]) -> None:
    converted = authz.convert(ap(spec))
    assert converted.policy is None and converted.warnings


def test_full_l4_rule_shape() -> None:
    spec = {"action": "ALLOW", "rules": [{
        "from": [{"source": {
            "principals": ["cluster.local/ns/shop/sa/web", "cluster.local/ns/ops/*", "*/sa/admin", "*"],
            "notPrincipals": ["cluster.local/ns/shop/sa/bad"],
            "namespaces": ["shop", "team-*"], "notNamespaces": ["*-dev"],
            "ipBlocks": ["10.1.0.0/16", "192.168.1.7", "fd00::/8"], "notIpBlocks": ["10.1.2.3"],
            "serviceAccounts": ["ops/robot", "web"], "notServiceAccounts": ["shop/legacy"],
        }}],
        "to": [{"operation": {"ports": ["8080", "9090"], "notPorts": ["15021"]}}],
        "when": [{"key": "destination.port", "values": ["443"]},
                 {"key": "source.ip", "notValues": ["10.9.0.0/24"]}],
    }]}
    got = as_json(spec)
    assert got == {
        "name": "p", "namespace": "shop", "scope": "Namespace", "action": "Allow", "dryRun": False,
        "rules": [[
            [{"destinationPorts": [8080, 9090], "notDestinationPorts": [15021]}],
            [{"principals": [{"Exact": "cluster.local/ns/shop/sa/web"}, {"Prefix": "cluster.local/ns/ops/"},
                             {"Suffix": "/sa/admin"}, {"Presence": {}}],
              "notPrincipals": [{"Exact": "cluster.local/ns/shop/sa/bad"}],
              "namespaces": [{"Exact": "shop"}, {"Prefix": "team-"}],
              "notNamespaces": [{"Suffix": "-dev"}],
              "sourceIps": ["10.1.0.0/16", "192.168.1.7/32", "fd00::/8"],
              "notSourceIps": ["10.1.2.3/32"],
              "serviceAccounts": [{"namespace": "ops", "serviceAccount": "robot"},
                                  {"namespace": "shop", "serviceAccount": "web"}],
              "notServiceAccounts": [{"namespace": "shop", "serviceAccount": "legacy"}]}],
            [{"destinationPorts": [443]}],
            [{"notSourceIps": ["10.9.0.0/24"]}],
        ]],
    }


def test_source_ips_are_raw_bytes_with_length() -> None:
    spec = {"rules": [{"from": [{"source": {"ipBlocks": ["10.1.0.0/16", "fd00::1"]}}]}]}
    pol = authz.convert(ap(spec)).policy
    assert pol is not None
    ips = pol.rules[0].clauses[0].matches[0].source_ips
    v6 = bytes.fromhex("fd00" + "00" * 13 + "01")
    assert [(a.address, a.length) for a in ips] == [(bytes([10, 1, 0, 0]), 16), (v6, 128)]


def test_several_sources_are_ored_in_one_clause_and_rules_are_separate() -> None:
    spec = {"rules": [{"from": [{"source": {"namespaces": ["a"]}}, {"source": {"namespaces": ["b"]}}]},
                      {"to": [{"operation": {"ports": ["80"]}}]}]}
    assert as_json(spec)["rules"] == [
        [[{"namespaces": [{"Exact": "a"}]}, {"namespaces": [{"Exact": "b"}]}]],
        [[{"destinationPorts": [80]}]],
    ]


def test_empty_rule_matches_everything_and_no_rules_match_nothing() -> None:
    assert as_json({"rules": [{}]})["rules"] == [[]]  # one rule, no clause: matches any connection
    assert as_json({})["rules"] == []  # ALLOW without rules: allow nothing


def test_principals_are_sent_without_spiffe_scheme() -> None:
    converted = authz.convert(ap({"rules": [{"from": [{"source": {
        "principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]}))
    assert converted.policy is not None
    match = policy_json(converted.policy)["rules"][0][0][0]
    assert match["principals"] == [{"Exact": "cluster.local/ns/a/sa/b"}]
    assert any("spiffe" in w for w in converted.warnings)


def test_http_only_allow_rule_is_dropped() -> None:
    spec = {"action": "ALLOW", "rules": [
        {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
        {"from": [{"source": {"requestPrincipals": ["*"]}}]},
        {"when": [{"key": "request.headers[x-user]", "values": ["a"]}]},
        {"from": [{"source": {"namespaces": ["ok"]}}]},
    ]}
    converted = authz.convert(ap(spec))
    assert converted.policy is not None
    # only the L4 rule is left: the HTTP ones can never match at L4 (more restrictive)
    assert policy_json(converted.policy)["rules"] == [[[{"namespaces": [{"Exact": "ok"}]}]]]
    assert len([w for w in converted.warnings if "ALLOW rule is omitted" in w]) == 3


def test_http_attributes_of_a_deny_rule_are_ignored() -> None:
    spec = {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["evil"]}}], "to": [{"operation": {"paths": ["/admin"]}}]},
        {"to": [{"operation": {"hosts": ["x.example"]}}]},
    ]}
    converted = authz.convert(ap(spec))
    assert converted.policy is not None
    # rule 1 denies everything from "evil" (not only /admin); rule 2 denies everything
    assert policy_json(converted.policy)["rules"] == [
        [[{}], [{"namespaces": [{"Exact": "evil"}]}]],
        [[{}]],
    ]
    assert any("DENY rule is enforced without them" in w for w in converted.warnings)


def test_invalid_ports_and_ips_are_skipped_with_a_warning() -> None:
    converted = authz.convert(ap({"rules": [{
        "from": [{"source": {"ipBlocks": ["10.0.0.0/33", "nonsense", "10.2.0.0/16"]}}],
        "to": [{"operation": {"ports": ["http", "70000", "81"]}}]}]}))
    assert converted.policy is not None
    assert policy_json(converted.policy)["rules"] == [
        [[{"destinationPorts": [81]}], [{"sourceIps": ["10.2.0.0/16"]}]]]
    assert len(converted.warnings) == 4


def test_integer_ports_written_in_yaml_are_accepted() -> None:
    assert as_json({"rules": [{"to": [{"operation": {"ports": [8080]}}]}]})["rules"] == [
        [[{"destinationPorts": [8080]}]]]


def test_dry_run_annotation() -> None:
    assert as_json({}, annotations={"istio.io/dry-run": "true"})["dryRun"] is True


def test_the_daemon_accepts_what_the_pilot_produces() -> None:
    """The client validates Authorization resources; everything converted must pass."""
    from daemon.xds.resources import AUTHORIZATION_TYPE, decode_authorization

    pol = authz.convert(ap({"action": "DENY", "rules": [{"from": [{"source": {
        "ipBlocks": ["10.0.0.0/8", "::1"], "notIpBlocks": ["1.2.3.4"]}}]}]})).policy
    assert pol is not None
    rec = decode_authorization("shop/p", AUTHORIZATION_TYPE, pol.SerializeToString(), "v1")
    assert (rec.name, rec.namespace, rec.scope, rec.action) == ("shop/p", "shop", az.NAMESPACE, az.DENY)


def test_selected_policies() -> None:
    pols = [
        ap({"selector": {"matchLabels": {"app": "a"}}}, ns="shop", name="sel-a"),
        ap({"selector": {"matchLabels": {"app": "a", "tier": "db"}}}, ns="shop", name="sel-a-db"),
        ap({"selector": {"matchLabels": {"app": "a"}}}, ns="other", name="elsewhere"),
        ap({"selector": {"matchLabels": {"app": "a"}}}, ns="istio-system", name="mesh-a"),
        ap({}, ns="shop", name="ns-wide"),
        ap({"selector": {}}, ns="shop", name="empty-selector"),
    ]
    assert authz.selected_policies(pols, "shop", {"app": "a"}) == ["istio-system/mesh-a", "shop/sel-a"]
    assert authz.selected_policies(pols, "shop", {"app": "a", "tier": "db"}) == [
        "istio-system/mesh-a", "shop/sel-a", "shop/sel-a-db"]
    assert authz.selected_policies(pols, "shop", {"app": "b"}) == []
    assert authz.selected_policies(pols, "other", {"app": "a"}) == ["istio-system/mesh-a", "other/elsewhere"]
