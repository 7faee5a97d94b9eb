"""AuthorizationPolicies created with the official kubernetes client reach a real XdsClient + State.

sandbox API server -> sandbox pilot (python -m sandbox.pilot) -> delta ADS (plaintext) ->
daemon.xds.client.XdsClient -> daemon.state.State, checked through ``State.config_dump()``
(the shapes ``istioctl ztunnel-config ... -o json`` reads). Each test uses its own namespace;
root-namespace policies are deleted by the test that creates them.
"""

from __future__ import annotations

from typing import Any

from tests.policy.conftest import ROOT_NS, Cluster, wait_for
from tests.support.kubectl import kubectl_path


def policies(state: Any, ns: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in state.config_dump()["policies"] if p["namespace"] == ns}


def workload_policies(state: Any, ns: str) -> dict[str, list[str]]:
    return {w["name"]: w["authorizationPolicies"] for w in state.config_dump()["workloads"]
            if w["namespace"] == ns}


def no_nacks(client: Any) -> None:
    st = client.status()
    assert st["nacks"] == 0, [h for h in st["history"] if not h["ack"]]


def test_policies_reach_the_state_in_istioctl_shape(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("p-shape")
    client, state = xds()
    cluster.policy(ns, "allow-web", {"action": "ALLOW", "rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/p-shape/sa/web"], "namespaces": ["front*"],
                             "ipBlocks": ["10.8.0.0/16"], "notIpBlocks": ["10.8.1.1"]}}],
        "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"]}}],
    }]})
    cluster.policy(ns, "deny-all", {"action": "DENY", "rules": [{}]}, version="v1beta1")
    wait_for(lambda: len(policies(state, ns)) == 2, 10, "both policies")
    got = policies(state, ns)
    assert got["allow-web"] == {
        "name": "allow-web", "namespace": ns, "scope": "Namespace", "action": "Allow", "dryRun": False,
        "rules": [[
            [{"destinationPorts": [8080], "notDestinationPorts": [9090]}],
            [{"principals": [{"Exact": "cluster.local/ns/p-shape/sa/web"}],
              "namespaces": [{"Prefix": "front"}], "sourceIps": ["10.8.0.0/16"],
              "notSourceIps": ["10.8.1.1/32"]}],
        ]],
    }
    assert got["deny-all"] == {"name": "deny-all", "namespace": ns, "scope": "Namespace", "action": "Deny",
                               "dryRun": False, "rules": [[]]}
    # xDS resource names are ns/name
    assert {f"{ns}/allow-web", f"{ns}/deny-all"} <= set(state.policies)
    no_nacks(client)


def test_root_namespace_policy_is_global_and_removed_on_delete(cluster: Cluster, xds: Any) -> None:
    client, state = xds()
    cluster.policy(ROOT_NS, "mesh-deny-legacy", {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["legacy"]}}]}]})
    try:
        got = wait_for(lambda: policies(state, ROOT_NS).get("mesh-deny-legacy"), 10, "global policy")
        assert (got["scope"], got["action"]) == ("Global", "Deny")
        assert got["rules"] == [[[{"namespaces": [{"Exact": "legacy"}]}]]]
    finally:
        cluster.delete_policy(ROOT_NS, "mesh-deny-legacy")
    wait_for(lambda: "mesh-deny-legacy" not in policies(state, ROOT_NS), 10, "global policy removed")
    assert f"{ROOT_NS}/mesh-deny-legacy" not in state.policies
    no_nacks(client)


def test_selector_policies_are_named_by_the_workloads_they_select(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("p-sel")
    cluster.pod(ns, "a1", {"app": "a"}, "10.70.0.1")
    cluster.pod(ns, "b1", {"app": "b"}, "10.70.0.2")
    client, state = xds()
    cluster.policy(ns, "only-a", {"selector": {"matchLabels": {"app": "a"}},
                                  "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]})
    deny_outsiders = {"from": [{"source": {"notNamespaces": [ns]}}]}
    cluster.policy(ns, "ns-wide", {"action": "DENY", "rules": [deny_outsiders]})
    only_a = {"a1": [f"{ns}/only-a"], "b1": []}
    wait_for(lambda: workload_policies(state, ns) == only_a, 10, "a1 names only-a")
    wait_for(lambda: {"only-a", "ns-wide"} <= set(policies(state, ns)), 10, "both policies arrived")
    pols = policies(state, ns)
    assert pols["only-a"]["scope"] == "WorkloadSelector" and pols["ns-wide"]["scope"] == "Namespace"

    # the pod's labels change: the policy follows
    cluster.label_pod(ns, "b1", {"app": "a"})
    wait_for(lambda: workload_policies(state, ns)["b1"] == [f"{ns}/only-a"], 10, "b1 relabelled")

    # a selector policy in the root namespace applies to matching pods of every namespace
    other = cluster.namespace("p-sel-other")
    cluster.pod(other, "a2", {"app": "a"}, "10.70.0.3")
    cluster.policy(ROOT_NS, "mesh-a", {"selector": {"matchLabels": {"app": "a"}}})
    try:
        want = [f"{ROOT_NS}/mesh-a", f"{ns}/only-a"]  # sorted, as istiod sends them
        wait_for(lambda: workload_policies(state, ns) == {"a1": want, "b1": want}, 10, "mesh-a attached")
        mesh_only = {"a2": [f"{ROOT_NS}/mesh-a"]}
        wait_for(lambda: workload_policies(state, other) == mesh_only, 10, "mesh-a in other ns")
        assert policies(state, ROOT_NS)["mesh-a"]["scope"] == "WorkloadSelector"
    finally:
        cluster.delete_policy(ROOT_NS, "mesh-a")
    wait_for(lambda: workload_policies(state, other) == {"a2": []}, 10, "mesh-a detached")

    # delete: the resource goes and no workload names it any more
    cluster.delete_policy(ns, "only-a")
    wait_for(lambda: workload_policies(state, ns) == {"a1": [], "b1": []}, 10, "only-a detached")
    wait_for(lambda: set(policies(state, ns)) == {"ns-wide"}, 10, "only-a removed")
    no_nacks(client)


def test_updates_and_deletes_are_deltas(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("p-delta")
    client, state = xds()
    cluster.policy(ns, "one", {"rules": [{"to": [{"operation": {"ports": ["1"]}}]}]})
    cluster.policy(ns, "two", {"rules": [{"to": [{"operation": {"ports": ["2"]}}]}]})
    wait_for(lambda: set(policies(state, ns)) == {"one", "two"}, 10, "both policies")
    version_two = state.policies[f"{ns}/two"].version
    seen: list[set[str]] = []
    state.subscribe(lambda change: seen.append(set(change.policies)) if change.policies else None)

    cluster.patch_policy(ns, "one", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["11"]}}]}]})
    wait_for(lambda: policies(state, ns)["one"]["action"] == "Deny", 10, "update applied")
    assert policies(state, ns)["one"]["rules"] == [[[{"destinationPorts": [11]}]]]
    assert seen == [{f"{ns}/one"}]  # only the changed policy was pushed
    assert state.policies[f"{ns}/two"].version == version_two

    cluster.delete_policy(ns, "one")
    wait_for(lambda: set(policies(state, ns)) == {"two"}, 10, "delete applied")
    assert seen == [{f"{ns}/one"}, {f"{ns}/one"}]
    no_nacks(client)


def test_actions_and_targets_ztunnel_does_not_enforce_are_not_sent(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("p-skip")
    client, state = xds()
    cluster.policy(ns, "audit", {"action": "AUDIT", "rules": [{}]})
    cluster.policy(ns, "custom", {"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{}]})
    cluster.policy(ns, "waypoint", {"targetRefs": [{"kind": "Service", "group": "", "name": "echo"}]})
    cluster.policy(ns, "http-only", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    # created last, so once it arrived the earlier ones would have too
    cluster.policy(ns, "marker", {"action": "DENY"})
    wait_for(lambda: "marker" in policies(state, ns), 10, "marker policy")
    got = policies(state, ns)
    assert set(got) == {"marker", "http-only"}
    assert got["http-only"]["rules"] == []  # the HTTP rule can never match at L4: allow nothing
    assert "ztunnel does not support the AUDIT action" in cluster.pilot_log()

    cluster.patch_policy(ns, "audit", {"action": "DENY", "rules": [{}]})
    wait_for(lambda: "audit" in policies(state, ns), 10, "audit turned DENY is sent")
    cluster.patch_policy(ns, "audit", {"action": "AUDIT", "rules": [{}]})
    wait_for(lambda: "audit" not in policies(state, ns), 10, "back to AUDIT: removed")
    no_nacks(client)


def test_reconnect_resyncs_policies_changed_while_away(cluster: Cluster, xds: Any) -> None:
    ns = cluster.namespace("p-resync")
    cluster.policy(ns, "stale", {"action": "DENY"})
    cluster.policy(ns, "kept", {})
    client, state = xds()
    wait_for(lambda: set(policies(state, ns)) == {"stale", "kept"}, 10, "initial policies")
    streams = client.status()["streams"]
    cluster.stop_pilot()
    try:
        cluster.delete_policy(ns, "stale")
        cluster.policy(ns, "fresh", {"action": "DENY"})
    finally:
        cluster.start_pilot()  # same ports
    wait_for(lambda: set(policies(state, ns)) == {"kept", "fresh"}, 20, "resynced after reconnect")
    assert client.status()["streams"] > streams
    # the new stream announced what the client held, so the pilot could name the removal
    authz_versions = client.last_initial_versions["type.googleapis.com/istio.security.Authorization"]
    assert f"{ns}/stale" in authz_versions and f"{ns}/kept" in authz_versions
    no_nacks(client)


def test_kubectl_apply_short_name_and_delete(cluster: Cluster, xds: Any, tmp_path: Any) -> None:
    """What users type: kubectl apply a v1beta1 manifest, list it as ``ap``, delete it."""
    import subprocess

    ns = cluster.namespace("p-kubectl")
    client, state = xds()
    manifest = tmp_path / "ap.yaml"
    manifest.write_text(f"""apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: from-front
  namespace: {ns}
spec:
  selector:
    matchLabels:
      app: api
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["front"]
    to:
    - operation:
        ports: ["8443"]
""")

    def kubectl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([kubectl_path(), "--kubeconfig", str(cluster.kubeconfig), *args],
                              capture_output=True, text=True, timeout=60, check=False)

    applied = kubectl("apply", "-f", str(manifest))
    assert applied.returncode == 0, applied.stderr
    assert "authorizationpolicy.security.istio.io/from-front created" in applied.stdout
    listed = kubectl("get", "ap", "-n", ns, "-o", "name")
    assert listed.stdout.split() == ["authorizationpolicy.security.istio.io/from-front"], listed.stderr
    got = wait_for(lambda: policies(state, ns).get("from-front"), 10, "applied policy")
    assert (got["scope"], got["action"]) == ("WorkloadSelector", "Allow")
    assert got["rules"] == [[[{"destinationPorts": [8443]}], [{"namespaces": [{"Exact": "front"}]}]]]
    deleted = kubectl("delete", "-f", str(manifest))
    assert deleted.returncode == 0, deleted.stderr
    wait_for(lambda: "from-front" not in policies(state, ns), 10, "deleted policy removed")
    no_nacks(client)
