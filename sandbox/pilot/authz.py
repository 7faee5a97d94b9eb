"""AuthorizationPolicy (security.istio.io) -> ``istio.security.Authorization``, as istiod does for ztunnel.

Pure functions over the plain JSON object, so they are testable without any server. The rules
follow istiod's ambient conversion (pilot/pkg/serviceregistry/kube/controller/ambient,
summarised in shared/reference/workload-xds.md section 1b):

- resource name ``ns/name``; policies with ``targetRef``/``targetRefs`` are for waypoints and
  are not sent; only ALLOW (the default) and DENY are sent (AUDIT and CUSTOM are not);
- scope: no ``selector`` -> NAMESPACE, or GLOBAL in the root namespace; a ``selector`` ->
  WORKLOAD_SELECTOR, and the policy is named in ``Workload.authorization_policies`` of the pods
  its ``matchLabels`` select (same namespace, or any namespace from the root namespace). A
  selector without labels selects no pod (istiod: a nil label selector attaches nowhere);
- each policy rule becomes one Rule (clauses AND-ed): a clause of the ``to`` operations
  (ports, notPorts), a clause of the ``from`` sources (principals, namespaces, ipBlocks,
  serviceAccounts and their negations), then one clause per ``when`` condition on an L4 key;
- ``*`` -> presence, ``*x`` -> suffix, ``x*`` -> prefix, else exact; ports and IPs that do not
  parse are skipped (istiod does the same; its validation webhook normally rejects them);
- HTTP-only attributes (hosts, methods, paths, remoteIpBlocks, requestPrincipals, non-L4 ``when``
  keys) cannot be enforced at L4. In an ALLOW policy the whole rule is dropped (it never
  matches: more restrictive); in a DENY policy only those attributes are ignored (the rule
  matches more: more restrictive). Either way a warning is returned, like istiod's status.

One deliberate leniency: principals are sent without a ``spiffe://`` scheme (ztunnel compares
identities without it, so a principal written with it could never match); a warning says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.xds.gen.istio.security import authorization_pb2 as az

ROOT_NAMESPACE = "istio-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
L4_WHEN_KEYS = ("source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port")
HTTP_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
HTTP_SOURCE_FIELDS = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
SPIFFE = "spiffe://"

Obj = Mapping[str, Any]


@dataclass
class Converted:
    """The resource to serve (None: not for ztunnel) and why it differs from the object, if it does."""

    policy: az.Authorization | None
    warnings: list[str] = field(default_factory=list)


def policy_key(obj: Obj) -> str:
    md = obj["metadata"]
    return f"{md['namespace']}/{md['name']}"


def _strings(values: Any) -> list[str]:
    if not values:
        return []
    if isinstance(values, (str, int)):
        values = [values]
    return [str(v) for v in values]


def string_matches(values: Iterable[str], principals: bool = False,
                   warnings: list[str] | None = None) -> list[az.StringMatch]:
    out = []
    for v in values:
        if principals and v.startswith(SPIFFE):
            if warnings is not None:
                warnings.append(f"principal {v!r} sent without the spiffe:// scheme")
            v = v[len(SPIFFE):]
        if v == "*":
            out.append(az.StringMatch(presence={}))
        elif v.startswith("*"):
            out.append(az.StringMatch(suffix=v[1:]))
        elif v.endswith("*"):
            out.append(az.StringMatch(prefix=v[:-1]))
        else:
            out.append(az.StringMatch(exact=v))
    return out


def addresses(values: Iterable[str], warnings: list[str]) -> list[az.Address]:
    """``10.0.0.1`` -> /32 (/128), ``10.0.0.0/8`` -> its prefix length; host bits are kept."""
    out = []
    for v in values:
        if not v:
            continue
        try:
            if "/" in v:
                text, bits = v.split("/", 1)
                addr = ipaddress.ip_address(text)
                length = int(bits)
                if not bits.isdigit() or length > addr.max_prefixlen:
                    raise ValueError(v)
            else:
                addr = ipaddress.ip_address(v)
                length = addr.max_prefixlen
        except ValueError:
            warnings.append(f"ignored invalid IP block {v!r}")
            continue
        out.append(az.Address(address=addr.packed, length=length))
    return out


def ports(values: Iterable[str], warnings: list[str]) -> list[int]:
    out = []
    for v in values:
        if v.isdigit() and int(v) <= 65535:
            out.append(int(v))
        else:
            warnings.append(f"ignored invalid port {v!r}")
    return out


def service_accounts(values: Iterable[str], namespace: str) -> list[az.ServiceAccountMatch]:
    """``ns/sa``, or ``sa`` in the policy's namespace."""
    out = []
    for v in values:
        ns, sep, sa = v.partition("/")
        out.append(az.ServiceAccountMatch(namespace=ns, serviceAccount=sa) if sep
                   else az.ServiceAccountMatch(namespace=namespace, serviceAccount=v))
    return out


def _present(d: Obj, names: Iterable[str]) -> list[str]:
    return [n for n in names if d.get(n)]


def _when_match(cond: Obj, warnings: list[str]) -> az.Match:
    key = cond.get("key", "")
    m = az.Match()
    for values, negate in ((_strings(cond.get("values")), False), (_strings(cond.get("notValues")), True)):
        if not values:
            continue
        if key == "source.namespace":
            (m.not_namespaces if negate else m.namespaces).extend(string_matches(values))
        elif key == "source.principal":
            (m.not_principals if negate else m.principals).extend(string_matches(values, True, warnings))
        elif key == "source.ip":
            (m.not_source_ips if negate else m.source_ips).extend(addresses(values, warnings))
        elif key == "destination.ip":
            (m.not_destination_ips if negate else m.destination_ips).extend(addresses(values, warnings))
        elif key == "destination.port":
            (m.not_destination_ports if negate else m.destination_ports).extend(ports(values, warnings))
    return m


def convert_rule(rule: Obj | None, action: int, namespace: str, warnings: list[str]) -> az.Rule | None:
    """One policy rule; None when an ALLOW rule needs HTTP attributes (it can never match at L4)."""
    rule = rule or {}
    http: list[str] = []
    out = az.Rule()
    to_clause = az.Clause()
    for to in rule.get("to") or []:
        op = (to or {}).get("operation") or {}
        http += _present(op, HTTP_OPERATION_FIELDS)
        to_clause.matches.add(destination_ports=ports(_strings(op.get("ports")), warnings),
                              not_destination_ports=ports(_strings(op.get("notPorts")), warnings))
    from_clause = az.Clause()
    for frm in rule.get("from") or []:
        src = (frm or {}).get("source") or {}
        http += _present(src, HTTP_SOURCE_FIELDS)
        from_clause.matches.add(
            source_ips=addresses(_strings(src.get("ipBlocks")), warnings),
            not_source_ips=addresses(_strings(src.get("notIpBlocks")), warnings),
            namespaces=string_matches(_strings(src.get("namespaces"))),
            not_namespaces=string_matches(_strings(src.get("notNamespaces"))),
            service_accounts=service_accounts(_strings(src.get("serviceAccounts")), namespace),
            not_service_accounts=service_accounts(_strings(src.get("notServiceAccounts")), namespace),
            principals=string_matches(_strings(src.get("principals")), True, warnings),
            not_principals=string_matches(_strings(src.get("notPrincipals")), True, warnings),
        )
    for clause in (to_clause, from_clause):
        if clause.matches:
            out.clauses.append(clause)
    for cond in rule.get("when") or []:
        cond = cond or {}
        if cond.get("key", "") not in L4_WHEN_KEYS:
            http.append(str(cond.get("key", "")))
        out.clauses.add().matches.append(_when_match(cond, warnings))
    if http:
        found = ", ".join(sorted(set(http)))
        if action == az.ALLOW:
            warnings.append(f"HTTP attributes ({found}) cannot be enforced by ztunnel: "
                            "the ALLOW rule is omitted (more restrictive than requested)")
            return None
        warnings.append(f"HTTP attributes ({found}) cannot be enforced by ztunnel: "
                        "the DENY rule is enforced without them (more restrictive than requested)")
    return out


def convert(obj: Obj, root_namespace: str = ROOT_NAMESPACE) -> Converted:
    """The Authorization istiod serves for an AuthorizationPolicy object (None: nothing served)."""
    md = obj["metadata"]
    spec = obj.get("spec") or {}
    if spec.get("targetRef") or spec.get("targetRefs"):
        return Converted(None, ["targetRef policies are enforced by waypoints, not sent to ztunnel"])
    action_name = spec.get("action") or "ALLOW"
    if action_name not in ("ALLOW", "DENY"):
        return Converted(None, [f"ztunnel does not support the {action_name} action"])
    action = az.ALLOW if action_name == "ALLOW" else az.DENY
    if "selector" in spec and spec["selector"] is not None:
        scope = az.WORKLOAD_SELECTOR
    else:
        scope = az.GLOBAL if md["namespace"] == root_namespace else az.NAMESPACE
    warnings: list[str] = []
    out = az.Authorization(name=md["name"], namespace=md["namespace"], scope=scope, action=action)
    if ((md.get("annotations") or {}).get(DRY_RUN_ANNOTATION) or "").lower() == "true":
        out.dry_run = True
    for rule in spec.get("rules") or []:
        converted = convert_rule(rule, action, md["namespace"], warnings)
        if converted is not None:
            out.rules.append(converted)
    return Converted(out, warnings)


def selector_labels(obj: Obj) -> dict[str, str] | None:
    """The labels a WORKLOAD_SELECTOR policy selects by; None when it attaches to no workload."""
    spec = obj.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    return dict(labels) or None


def selected_policies(policies: Iterable[Obj], namespace: str, labels: Mapping[str, str],
                      root_namespace: str = ROOT_NAMESPACE) -> list[str]:
    """Sorted ``ns/name`` of the selector policies that apply to a pod (istiod buildWorkloadPolicies).

    ``policies`` are the objects that are served (``convert`` gave a policy): a policy that is
    not sent must not be referenced either.
    """
    out = []
    for obj in policies:
        ns = obj["metadata"].get("namespace", "")
        if ns != namespace and ns != root_namespace:
            continue
        sel = selector_labels(obj)
        if sel is None or any(labels.get(k) != v for k, v in sel.items()):
            continue
        out.append(policy_key(obj))
    return sorted(out)
