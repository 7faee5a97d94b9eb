"""The authz program judging real SYNs on a real veth, with tables written by the compiler.

Policies are written as AuthorizationPolicy objects and converted by the sandbox pilot's
converter (the same Authorization messages istiod sends); the daemon is not involved here
(tests/authz/test_daemon_authz.py covers the whole path).
"""

from __future__ import annotations

from typing import Any

from sandbox.pilot.authz import convert
from tests.authz.conftest import CLI_IP6, NODE_IP, SRV2_IP, SRV_IP6, SRV_IPS, KernelEnv

FORTIO = SRV_IPS[0]


def pol(ns: str, name: str, spec: dict[str, Any], dry_run: bool = False) -> tuple[str, Any]:
    md: dict[str, Any] = {"name": name, "namespace": ns}
    if dry_run:
        md["annotations"] = {"istio.io/dry-run": "true"}
    return f"{ns}/{name}", convert({"metadata": md, "spec": spec}).policy


def policies(*items: tuple[str, Any]) -> dict[str, Any]:
    return dict(items)


def outcome(kenv: KernelEnv, src: str, dst: str = FORTIO, port: int = 8080) -> str:
    return kenv.cli.attempt(dst, port, src, timeout=2.0)["result"]


def test_deny_namespace_refuses_fast_and_server_never_sees_it(kenv: KernelEnv) -> None:
    kenv.apply(policies(pol("default", "deny-other", {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["other"]}}]}]})))
    before = len(kenv.accepted())
    times = []
    for _ in range(20):
        r = kenv.cli.attempt(FORTIO, 8080, "10.77.0.4", timeout=2.0)
        assert r["result"] == "refused", r
        times.append(r["ms"])
    assert len(kenv.accepted()) == before, "a refused SYN reached the server process"
    assert max(times) < 100, times
    assert outcome(kenv, "10.77.0.2") == "ok"
    assert outcome(kenv, "10.77.0.6") == "ok"  # unknown source: not in namespace "other"
    assert len(kenv.accepted()) == before + 2


def test_allow_principal_and_port(kenv: KernelEnv) -> None:
    kenv.apply(policies(pol("default", "allow-netutils", {"rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/default/sa/netutils"]}}],
        "to": [{"operation": {"ports": ["8080"]}}]}]})))
    assert outcome(kenv, "10.77.0.2", port=8080) == "ok"
    assert outcome(kenv, "10.77.0.2", port=9090) == "refused"
    assert outcome(kenv, "10.77.0.3", port=8080) == "refused"
    assert outcome(kenv, "10.77.0.4", port=8080) == "refused"
    assert outcome(kenv, "10.77.0.6", port=8080) == "refused"  # unknown: no principal
    # the second address of the same workload is judged by the same policy
    assert outcome(kenv, "10.77.0.2", dst=SRV_IPS[1], port=8080) == "ok"
    # node address (kubelet probes) is exempt; an unlinked pod is never filtered
    assert kenv.node.attempt(FORTIO, 9090, NODE_IP)["result"] == "ok"
    assert outcome(kenv, "10.77.0.4", dst=SRV2_IP, port=9090) == "ok"
    kenv.apply({})
    assert outcome(kenv, "10.77.0.4", port=9090) == "ok"


def test_ipv6_syn_is_judged_and_answered(kenv: KernelEnv) -> None:
    """The same tables for an IPv6 SYN: identity by the v6 address, v6 CIDRs, a v6 reset."""
    kenv.apply(policies(pol("default", "deny-other", {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["other"]}}]}]})))
    r = kenv.cli.attempt(SRV_IP6, 8080, CLI_IP6, timeout=2.0)
    assert r["result"] == "refused" and r["ms"] < 100, r
    kenv.apply(policies(pol("default", "deny-v6-block", {"action": "DENY", "rules": [
        {"from": [{"source": {"ipBlocks": ["fd00:77::/120"]}}],
         "to": [{"operation": {"ports": ["9090"]}}]}]})))
    assert kenv.cli.attempt(SRV_IP6, 9090, CLI_IP6)["result"] == "refused"
    assert kenv.cli.attempt(SRV_IP6, 8080, CLI_IP6)["result"] == "ok"
    assert kenv.cli.attempt(SRV_IPS[0], 9090, "10.77.0.4")["result"] == "ok"  # v4 source: not in the block
    kenv.apply({})
    assert kenv.cli.attempt(SRV_IP6, 9090, CLI_IP6)["result"] == "ok"
