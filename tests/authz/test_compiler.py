"""The compiler alone (no kernel): limits, ordering, sharing; the kernel tests prove semantics."""

from __future__ import annotations

import ipaddress

import pytest

from daemon.authz import layout as L
from daemon.authz.compiler import CompileError, Identity, WorkloadInfo, compile_tables, stable_ids
from daemon.xds.gen.istio.security import authorization_pb2 as az


def wl(name: str, ns: str, ip: str, node: str = "n1", policies: tuple[str, ...] = ()) -> WorkloadInfo:
    return WorkloadInfo(uid=f"u/{ns}/{name}", name=name, namespace=ns,
                        addresses=(ipaddress.ip_address(ip).packed,),
                        identity=Identity("cluster.local", ns, name), node=node, policies=policies)


def deny_ns(name: str, ns: str, src_ns: str) -> az.Authorization:
    p = az.Authorization(name=name, namespace=ns, scope=az.NAMESPACE, action=az.DENY)
    p.rules.add().clauses.add().matches.add().namespaces.add(exact=src_ns)
    return p


def test_rulesets_shared_deny_first_and_only_local_workloads() -> None:
    pols = {"a/z-deny": deny_ns("z-deny", "a", "b"),
            "a/allow": az.Authorization(name="allow", namespace="a", scope=az.NAMESPACE, action=az.ALLOW)}
    c = compile_tables(pols, [wl("x", "a", "10.0.0.1"), wl("y", "a", "10.0.0.2"),
                              wl("remote", "a", "10.0.0.3", node="n2")], epoch=1, node="n1")
    assert len(c.rulesets) == 1
    (rid, names), = c.rulesets.items()
    assert rid & L.EPOCH_BIT and names == ["a/z-deny", "a/allow"]  # DENY first
    assert len(c.dst) == 2 and sorted(c.selected["a/allow"]) == ["u/a/x", "u/a/y"]
    assert all(L.ADDR_KEY.unpack(k)[0] == 1 for k in [*c.dst, *c.ident])


def test_unknown_sources_pass_only_negative_identity_kinds() -> None:
    p = az.Authorization(name="p", namespace="a", scope=az.NAMESPACE, action=az.DENY)
    p.rules.add().clauses.add().matches.add().not_namespaces.add(exact="a")
    c = compile_tables({"a/p": p}, [wl("x", "a", "10.0.0.1"), wl("y", "b", "10.0.0.2")], epoch=0)
    words = {L.BITS_KEY.unpack(k): L.U64.unpack(v)[0] for k, v in c.bits.items()}
    (_, bits), = words.items()
    ids = {ident.namespace: i for i, ident in c.identities.items()}
    assert bits & 1 and bits >> ids["b"] & 1 and not bits >> ids["a"] & 1


def test_too_many_matches_for_one_workload_is_refused() -> None:
    p = az.Authorization(name="big", namespace="a", scope=az.NAMESPACE, action=az.DENY)
    clause = p.rules.add().clauses.add()
    for i in range(L.MAX_ENTRIES + 1):
        clause.matches.add().destination_ports.append(i + 1)
    with pytest.raises(CompileError, match="at most 1024"):
        compile_tables({"a/big": p}, [wl("x", "a", "10.0.0.1")], epoch=0)


def test_stable_ids_avoid_zero_and_collisions() -> None:
    ids = stable_ids([f"ns/p{i}" for i in range(5000)])
    assert len(set(ids.values())) == 5000 and 0 not in ids.values()
    assert stable_ids(["ns/p1"])["ns/p1"] == ids["ns/p1"]
