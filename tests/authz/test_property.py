"""Property: for random policies, the kernel's verdict on a real connection equals a reference.

The reference evaluator below is written from the semantics in
shared/reference/workload-xds.md section 1b (ztunnel's ``assert_rbac``) directly over the
Authorization messages; it shares no code with daemon/authz/compiler.py. Each example writes a
random policy set through the compiler and tries every (source, destination address, port)
of the kernel environment with real TCP.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.xds.gen.istio.security import authorization_pb2 as az
from tests.authz.conftest import PORTS, SOURCES, SRV_IPS, KernelEnv

NAMESPACES = ["default", "other", "prod"]
PRINCIPALS = ["cluster.local/ns/default/sa/netutils", "cluster.local/ns/other/sa/curl"]


# ----- reference evaluator ----------------------------------------------------------------------
def ref_string(sm: az.StringMatch, value: str | None) -> bool:
    if value is None:
        return False
    kind = sm.WhichOneof("match_type")
    return {"exact": lambda: value == sm.exact, "prefix": lambda: value.startswith(sm.prefix),
            "suffix": lambda: value.endswith(sm.suffix), "presence": lambda: True}.get(kind, lambda: False)()


def ref_in_net(ip: str, addrs: Any) -> bool:
    a = ipaddress.ip_address(ip)
    for x in addrs:
        net = ipaddress.ip_network(f"{ipaddress.ip_address(bytes(x.address))}/{x.length}", strict=False)
        if a.version == net.version and a in net:
            return True
    return False


def ref_match(m: az.Match, src: str, who: tuple[str, str] | None, dst: str, port: int) -> bool:
    ns = who[0] if who else None
    principal = f"cluster.local/ns/{who[0]}/sa/{who[1]}" if who else None

    def any_of(values: Any, test: Any) -> bool:
        return any(test(v) for v in values)

    def sa_is(s: az.ServiceAccountMatch) -> bool:
        return who is not None and (s.namespace, s.serviceAccount) == who

    checks = [
        (m.namespaces, lambda: any_of(m.namespaces, lambda s: ref_string(s, ns))),
        (m.not_namespaces, lambda: not any_of(m.not_namespaces, lambda s: ref_string(s, ns))),
        (m.principals, lambda: any_of(m.principals, lambda s: ref_string(s, principal))),
        (m.not_principals, lambda: not any_of(m.not_principals, lambda s: ref_string(s, principal))),
        (m.service_accounts, lambda: any_of(m.service_accounts, sa_is)),
        (m.not_service_accounts, lambda: not any_of(m.not_service_accounts, sa_is)),
        (m.source_ips, lambda: ref_in_net(src, m.source_ips)),
        (m.not_source_ips, lambda: not ref_in_net(src, m.not_source_ips)),
        (m.destination_ips, lambda: ref_in_net(dst, m.destination_ips)),
        (m.not_destination_ips, lambda: not ref_in_net(dst, m.not_destination_ips)),
        (m.destination_ports, lambda: port in m.destination_ports),
        (m.not_destination_ports, lambda: port not in m.not_destination_ports),
    ]
    return all(check() for present, check in checks if len(present))


def ref_policy(p: az.Authorization, *conn: Any) -> bool:
    return any(all(any(ref_match(m, *conn) for m in c.matches) for c in r.clauses) for r in p.rules)


def ref_allowed(pols: list[az.Authorization], selected: set[str], *conn: Any) -> bool:
    applies = [p for p in pols if not p.dry_run and (
        p.scope == az.GLOBAL or (p.scope == az.NAMESPACE and p.namespace == "default")
        or f"{p.namespace}/{p.name}" in selected)]
    if any(ref_policy(p, *conn) for p in applies if p.action == az.DENY):
        return False
    allows = [p for p in applies if p.action == az.ALLOW]
    return not allows or any(ref_policy(p, *conn) for p in allows)


# ----- strategies ---------------------------------------------------------------------------------
def smatch(values: list[str]) -> st.SearchStrategy[az.StringMatch]:
    return st.one_of(
        st.sampled_from(values).map(lambda v: az.StringMatch(exact=v)),
        st.sampled_from(values).map(lambda v: az.StringMatch(prefix=v[: max(1, len(v) // 2)])),
        st.sampled_from(values).map(lambda v: az.StringMatch(suffix=v[len(v) // 2:])),
        st.just(az.StringMatch(presence={})),
    )


CIDRS = ["10.77.0.2/32", "10.77.0.4/31", "10.77.0.0/24", "10.77.0.6/32", "10.0.0.0/8", "192.168.0.0/16",
         "10.77.0.10/32", "10.77.0.11/32"]


def addr(cidr: str) -> az.Address:
    net = ipaddress.ip_network(cidr)
    return az.Address(address=net.network_address.packed, length=net.prefixlen)


@st.composite
def matches(draw: st.DrawFn) -> az.Match:
    m = az.Match()
    kinds = draw(st.sets(st.sampled_from([
        "namespaces", "not_namespaces", "principals", "not_principals", "service_accounts",
        "not_service_accounts", "source_ips", "not_source_ips", "destination_ips", "not_destination_ips",
        "destination_ports", "not_destination_ports"]), max_size=3))
    for k in kinds:
        n = draw(st.integers(1, 2))
        for _ in range(n):
            if k.endswith("namespaces"):
                getattr(m, k).append(draw(smatch(NAMESPACES)))
            elif k.endswith("principals"):
                getattr(m, k).append(draw(smatch(PRINCIPALS)))
            elif k.endswith("service_accounts"):
                ns, sa = draw(st.sampled_from([("default", "netutils"), ("other", "curl"), ("prod", "x")]))
                getattr(m, k).append(az.ServiceAccountMatch(namespace=ns, serviceAccount=sa))
            elif k.endswith("_ips"):
                getattr(m, k).append(addr(draw(st.sampled_from(CIDRS))))
            else:
                getattr(m, k).append(draw(st.sampled_from([*PORTS, 1234])))
    return m


@st.composite
def policies(draw: st.DrawFn) -> tuple[list[az.Authorization], set[str]]:
    out = []
    selected: set[str] = set()
    for i in range(draw(st.integers(1, 3))):
        ns = draw(st.sampled_from(["default", "istio-system", "other"]))
        p = az.Authorization(name=f"p{i}", namespace=ns, action=draw(st.sampled_from([az.ALLOW, az.DENY])),
                             dry_run=draw(st.booleans()) and draw(st.booleans()))
        p.scope = az.GLOBAL if p.namespace == "istio-system" else draw(st.sampled_from(
            [az.NAMESPACE, az.WORKLOAD_SELECTOR]))
        if p.scope == az.WORKLOAD_SELECTOR and draw(st.booleans()):
            selected.add(f"{p.namespace}/{p.name}")
        for _ in range(draw(st.integers(0, 2))):
            r = p.rules.add()
            for _ in range(draw(st.integers(0, 2))):
                c = r.clauses.add()
                for _ in range(draw(st.integers(0, 2))):
                    c.matches.append(draw(matches()))
        out.append(p)
    return out, selected


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(case=policies())
def test_kernel_verdict_equals_reference(kenv: KernelEnv,
                                         case: tuple[list[az.Authorization], set[str]]) -> None:
    pols, selected = case
    workloads = [replace(w, policies=tuple(selected)) if w.name == "fortio-0" else w
                 for w in kenv.workloads()]
    kenv.apply({f"{p.namespace}/{p.name}": p for p in pols}, workloads)
    wrong = []
    for src, who in SOURCES.items():
        for dst in SRV_IPS:
            for port in PORTS:
                want = "ok" if ref_allowed(pols, selected, src, who, dst, port) else "refused"
                got = kenv.cli.attempt(dst, port, src, timeout=2.0)["result"]
                if got != want:
                    wrong.append((src, dst, port, want, got))
    assert not wrong, (wrong, [str(p) for p in pols], selected)
