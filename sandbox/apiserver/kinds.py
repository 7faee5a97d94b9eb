"""The resource types the sandbox API server serves.

One table drives discovery, routing, storage keys and OpenAPI stubs, so adding a kind is
one line here (plus optional defaulting/validation elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResourceType:
    """A REST resource: ``/apis/<group>/<version>/[namespaces/<ns>/]<plural>``."""

    group: str
    versions: tuple[str, ...]
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    builtin: bool = True  # built-in kinds get strategic merge patch; CRD-like ones do not
    verbs: tuple[str, ...] = field(
        default=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
    )

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def group_kind(self) -> str:
        """``Deployment.apps`` style name used in Status messages (``pods`` for core)."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


_STD = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
_ISTIO_VERSIONS = ("v1alpha3", "v1beta1")
_ISTIO_SECURITY_VERSIONS = ("v1", "v1beta1")  # security.istio.io serves both (v1 stored)

RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", ("v1",), "Namespace", "namespaces", False, ("ns",), ("status",)),
    ResourceType("", ("v1",), "Node", "nodes", False, ("no",), ("status",)),
    ResourceType(
        "", ("v1",), "Pod", "pods", True, ("po",), ("status", "log", "exec", "portforward"), ("all",)
    ),
    ResourceType("", ("v1",), "Service", "services", True, ("svc",), ("status",), ("all",)),
    ResourceType("", ("v1",), "Endpoints", "endpoints", True, ("ep",)),
    ResourceType("", ("v1",), "ServiceAccount", "serviceaccounts", True, ("sa",), ("token",)),
    ResourceType("", ("v1",), "ConfigMap", "configmaps", True, ("cm",)),
    ResourceType("", ("v1",), "Secret", "secrets", True),
    ResourceType("", ("v1",), "Event", "events", True, ("ev",)),
    ResourceType(
        "apps", ("v1",), "Deployment", "deployments", True, ("deploy",), ("status", "scale"), ("all",)
    ),
    ResourceType("apps", ("v1",), "DaemonSet", "daemonsets", True, ("ds",), ("status",), ("all",)),
    ResourceType("apps", ("v1",), "ReplicaSet", "replicasets", True, ("rs",), ("status", "scale"), ("all",)),
    ResourceType(
        "apps", ("v1",), "StatefulSet", "statefulsets", True, ("sts",), ("status", "scale"), ("all",)
    ),
    ResourceType("coordination.k8s.io", ("v1",), "Lease", "leases", True),
    ResourceType("discovery.k8s.io", ("v1",), "EndpointSlice", "endpointslices", True),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "ClusterRole", "clusterroles", False),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "ClusterRoleBinding", "clusterrolebindings", False),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "Role", "roles", True),
    ResourceType("rbac.authorization.k8s.io", ("v1",), "RoleBinding", "rolebindings", True),
    ResourceType("authentication.k8s.io", ("v1",), "TokenReview", "tokenreviews", False, verbs=("create",)),
    ResourceType(
        "networking.istio.io",
        _ISTIO_VERSIONS,
        "EnvoyFilter",
        "envoyfilters",
        True,
        builtin=False,
        categories=("istio-io", "networking-istio-io"),
    ),
    ResourceType(
        "networking.istio.io",
        _ISTIO_VERSIONS,
        "VirtualService",
        "virtualservices",
        True,
        ("vs",),
        builtin=False,
        categories=("istio-io", "networking-istio-io"),
    ),
    ResourceType(
        "networking.istio.io",
        _ISTIO_VERSIONS,
        "DestinationRule",
        "destinationrules",
        True,
        ("dr",),
        builtin=False,
        categories=("istio-io", "networking-istio-io"),
    ),
    ResourceType(
        "security.istio.io",
        _ISTIO_SECURITY_VERSIONS,
        "AuthorizationPolicy",
        "authorizationpolicies",
        True,
        ("ap",),
        builtin=False,
        categories=("istio-io", "security-istio-io"),
    ),
    ResourceType(
        "security.istio.io",
        _ISTIO_SECURITY_VERSIONS,
        "PeerAuthentication",
        "peerauthentications",
        True,
        ("pa",),
        builtin=False,
        categories=("istio-io", "security-istio-io"),
    ),
    ResourceType(
        "gateway.networking.k8s.io",
        ("v1",),
        "Gateway",
        "gateways",
        True,
        ("gtw",),
        ("status",),
        builtin=False,
        categories=("gateway-api",),
    ),
    ResourceType(
        "gateway.networking.k8s.io",
        ("v1",),
        "GatewayClass",
        "gatewayclasses",
        False,
        ("gc",),
        ("status",),
        builtin=False,
        categories=("gateway-api",),
    ),
)


def groups() -> dict[str, list[str]]:
    """Group name -> versions served, in preferred-first order ("" is the core group)."""
    out: dict[str, list[str]] = {}
    for rt in RESOURCES:
        vs = out.setdefault(rt.group, [])
        for v in rt.versions:
            if v not in vs:
                vs.append(v)
    # Kubernetes prefers the most stable version: v1beta1 over v1alpha3.
    for g, vs in out.items():
        out[g] = sorted(vs, key=_version_rank)
    return out


def _version_rank(v: str) -> tuple[int, int]:
    import re

    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", v)
    if not m:
        return (9, 0)
    major, stage, minor = int(m.group(1)), m.group(2), int(m.group(3) or 0)
    stage_rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (stage_rank, -major * 1000 - minor)


def resources_in(group: str, version: str) -> list[ResourceType]:
    return [rt for rt in RESOURCES if rt.group == group and version in rt.versions]


def lookup(group: str, version: str, plural: str) -> ResourceType | None:
    for rt in RESOURCES:
        if rt.group == group and rt.plural == plural and version in rt.versions:
            return rt
    return None


def by_kind(kind: str, group: str | None = None) -> ResourceType | None:
    for rt in RESOURCES:
        if rt.kind == kind and (group is None or rt.group == group):
            return rt
    return None
