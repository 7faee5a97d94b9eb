"""``kmeshctl dump policies`` against the real daemon (python -m daemon) fed by the sandbox pilot."""

from __future__ import annotations

import json

import pytest

from tests.policy.conftest import ROOT_NS, Cluster, Daemon, wait_for

pytestmark = pytest.mark.kernel


def _fresh_dump(cluster: Cluster) -> dict:
    """An independent subscription to the pilot (new XdsClient + State): what the daemon should hold."""
    from daemon.state import State
    from daemon.xds.client import XdsClient, XdsConfig

    state = State(node_name="node-1", cluster_id="Kubernetes")
    client = XdsClient(XdsConfig(address=cluster.xds_address, plaintext=True, pod_name="dump-check",
                                 pod_namespace="kmesh-system", node_name="node-1"), state)
    client.start()
    try:
        wait_for(lambda: client.status()["ready"], 20, "fresh xDS client ready")
        return state.config_dump()
    finally:
        client.stop()


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()[1:]]


def test_dump_policies_table_and_json(cluster: Cluster, daemon: Daemon) -> None:
    ns = cluster.namespace("p-dump")
    cluster.pod(ns, "web-1", {"app": "web"}, "10.71.0.1")
    cluster.policy(ns, "allow-nothing", {})
    cluster.policy(ns, "allow-web", {"selector": {"matchLabels": {"app": "web"}}, "rules": [
        {"from": [{"source": {"namespaces": ["front"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]})
    cluster.policy(ns, "deny-legacy", {"action": "DENY", "rules": [
        {"from": [{"source": {"principals": ["cluster.local/ns/legacy/sa/*"]}}]}]})
    cluster.policy(ROOT_NS, "mesh-deny-ip", {"action": "DENY", "rules": [
        {"from": [{"source": {"ipBlocks": ["192.0.2.0/24"]}}]}]})
    try:
        want_rows = [
            [ROOT_NS, "mesh-deny-ip", "Deny", "Global"],
            [ns, "allow-nothing", "Allow", "Namespace"],
            [ns, "allow-web", "Allow", "WorkloadSelector"],
            [ns, "deny-legacy", "Deny", "Namespace"],
        ]

        def table() -> list[str] | None:
            r = daemon.kmeshctl("dump", "policies")
            rows = [row[:4] for row in _rows(r.stdout) if row[0] in (ns, ROOT_NS)]  # + SELECTS (authz)
            return r.stdout.splitlines() if r.returncode == 0 and rows == want_rows else None

        lines = wait_for(table, 30, "daemon shows the four policies", interval=0.3)
        assert lines[0].split() == ["NAMESPACE", "POLICY", "NAME", "ACTION", "SCOPE", "SELECTS"]
        # tabwriter layout: columns start where the header's do
        header = lines[0]
        row = next(line for line in lines if " allow-web " in line)
        for col in ("POLICY NAME", "ACTION", "SCOPE"):
            start = header.index(col)
            assert row[start - 1] == " " and row[start] != " ", (header, row)

        out = daemon.kmeshctl("dump", "policies", "-o", "json")
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        from kmeshctl.dump import json_section

        assert shown == json_section(_fresh_dump(cluster), "policies")
        mine = {p["name"]: p for p in shown if p["namespace"] == ns}
        assert mine["allow-web"]["rules"] == [[[{"destinationPorts": [8080]}],
                                               [{"namespaces": [{"Exact": "front"}]}]]]
        legacy = [{"principals": [{"Prefix": "cluster.local/ns/legacy/sa/"}]}]
        assert mine["deny-legacy"]["rules"] == [[legacy]]
        workloads = json.loads(daemon.kmeshctl("dump", "workloads", "-o", "json").stdout)
        web = next(w for w in workloads if w["namespace"] == ns and w["name"] == "web-1")
        assert web["authorizationPolicies"] == [f"{ns}/allow-web"]
    finally:
        cluster.delete_policy(ROOT_NS, "mesh-deny-ip")

    cluster.delete_policy(ns, "allow-web")

    def gone() -> bool:
        rows = _rows(daemon.kmeshctl("dump", "policies").stdout)
        names = {(r[0], r[1]) for r in rows}
        return (ns, "allow-web") not in names and (ROOT_NS, "mesh-deny-ip") not in names

    wait_for(gone, 30, "deleted policies leave the daemon", interval=0.3)
    xds = daemon.get("/status")["xds"]
    assert xds["nacks"] == 0 and xds["acks"] > 0, xds
