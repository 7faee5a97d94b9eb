"""A thin, dict-based REST layer over the official kubernetes ApiClient.

install/uninstall handle a fixed set of kinds, core and custom alike (EnvoyFilter), with
server-side apply and dry run; working on plain dicts through one ``request`` function keeps
that uniform. Authentication, TLS and proxies are the ApiClient's (from load_kube).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient

FIELD_MANAGER = "kmeshctl"
_REQUEST_TIMEOUT = 30


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    kind: str
    api_version: str  # "v1" or "group/version"
    plural: str
    namespaced: bool

    def collection(self, namespace: str | None = None) -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace:
            return f"{prefix}/namespaces/{quote(namespace)}/{self.plural}"
        return f"{prefix}/{self.plural}"

    def path(self, name: str, namespace: str | None = None) -> str:
        return f"{self.collection(namespace)}/{quote(name)}"


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("Namespace", "v1", "namespaces", False),
        Kind("ServiceAccount", "v1", "serviceaccounts", True),
        Kind("ClusterRole", "rbac.authorization.k8s.io/v1", "clusterroles", False),
        Kind("ClusterRoleBinding", "rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
        Kind("DaemonSet", "apps/v1", "daemonsets", True),
        Kind("EnvoyFilter", "networking.istio.io/v1alpha3", "envoyfilters", True),
    )
}
POD = Kind("Pod", "v1", "pods", True)
SERVICE = Kind("Service", "v1", "services", True)
NAMESPACE = KINDS["Namespace"]


def kind_of(obj: dict) -> Kind:
    """The Kind entry of a manifest object (KeyError for kinds install does not manage)."""
    return KINDS[obj["kind"]]


def object_path(obj: dict) -> str:
    meta = obj["metadata"]
    return kind_of(obj).path(meta["name"], meta.get("namespace"))


def request(api: ApiClient, method: str, path: str, query: list[tuple[str, str]] | None = None,
            body: Any = None, content_type: str | None = None) -> dict:
    """One API call; returns the decoded JSON body, raises kubernetes ApiException on >= 300."""
    headers = {"Accept": "application/json"}
    if content_type:
        headers["Content-Type"] = content_type
    params = api.param_serialize(method=method, resource_path=path, query_params=query or [],
                                 header_params=headers, body=body, auth_settings=["BearerToken"])
    resp = api.call_api(*params, _request_timeout=_REQUEST_TIMEOUT)
    resp.read()
    types = {"2XX": "object", "4XX": "object", "5XX": "object", "default": "object"}
    data = api.response_deserialize(resp, types).data
    return data if isinstance(data, dict) else {}


def get(api: ApiClient, path: str) -> dict | None:
    """GET an object; None when it does not exist (404)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return request(api, "GET", path)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def apply(api: ApiClient, obj: dict, dry_run: bool, force: bool = False) -> dict:
    """Server-side apply of one object with field manager ``kmeshctl``."""
    query = [("fieldManager", FIELD_MANAGER)]
    if force:
        query.append(("force", "true"))
    if dry_run:
        query.append(("dryRun", "All"))
    return request(api, "PATCH", object_path(obj), query, body=obj,
                   content_type="application/apply-patch+yaml")


def merge_patch(api: ApiClient, path: str, patch: dict) -> dict:
    return request(api, "PATCH", path, body=patch, content_type="application/merge-patch+json")


def status_of(exc: BaseException) -> tuple[int | None, str, str, dict]:
    """(HTTP status, reason, message, details) of an ApiException's Status body."""
    import json

    status = getattr(exc, "status", None)
    body: dict = {}
    raw = getattr(exc, "body", None)
    if raw:
        try:
            parsed = json.loads(raw)
            body = parsed if isinstance(parsed, dict) else {}
        except (ValueError, TypeError):
            body = {}
    message = " ".join(str(body.get("message") or getattr(exc, "reason", "") or "").split())
    return status, str(body.get("reason") or ""), message, body.get("details") or {}
