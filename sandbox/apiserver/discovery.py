"""Discovery documents (/version, /api, /apis, group/version resource lists) and OpenAPI stubs.

kubectl needs the legacy discovery documents to map kinds to resources. For
``apply --server-side`` with its default strict validation it checks, through OpenAPI v3,
that the server supports the ``fieldValidation`` query parameter for the kind's PATCH; the
v3 documents served here declare exactly that (and nothing else), so kubectl leaves
validation to the server instead of needing full schemas.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from . import kinds

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-sandbox",
    "gitCommit": "sandbox",
    "gitTreeState": "clean",
    "buildDate": "2026-01-01T00:00:00Z",
    "goVersion": "go1.23",
    "compiler": "gc",
    "platform": "linux/amd64",
}

_SERVER_ADDR = [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]


def api_versions() -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": _SERVER_ADDR}


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    vs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": vs, "preferredVersion": vs[0]}


def api_group_list() -> dict[str, Any]:
    groups = [_group(g, vs) for g, vs in kinds.groups().items() if g]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def api_group(name: str) -> dict[str, Any] | None:
    vs = kinds.groups().get(name)
    if not name or not vs:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name, vs)}


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    rts = kinds.resources_in(group, version)
    if not rts:
        return None
    out: list[dict[str, Any]] = []
    for rt in rts:
        entry: dict[str, Any] = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        entry["storageVersionHash"] = hashlib.sha256(f"{rt.group}/{rt.kind}".encode()).hexdigest()[:12]
        out.append(entry)
        for sub in rt.subresources:
            sub_entry: dict[str, Any] = {
                "name": f"{rt.plural}/{sub}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
            }
            if sub == "status":
                sub_entry["verbs"] = ["get", "patch", "update"]
            elif sub == "scale":
                sub_entry.update(
                    group="autoscaling", version="v1", kind="Scale", verbs=["get", "patch", "update"]
                )
            elif sub == "token":
                sub_entry.update(
                    group="authentication.k8s.io", version="v1", kind="TokenRequest", verbs=["create"]
                )
            elif sub == "log":
                sub_entry["verbs"] = ["get"]
            elif sub in ("exec", "portforward"):
                sub_entry.update(kind="PodExecOptions" if sub == "exec" else "PodPortForwardOptions",
                                 verbs=["create", "get"])
            out.append(sub_entry)
    gv = f"{group}/{version}" if group else version
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out}


def _gv_path(group: str, version: str) -> str:
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def openapi_v3_root() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for group, versions in kinds.groups().items():
        for v in versions:
            p = _gv_path(group, v)
            digest = hashlib.sha256(json.dumps(openapi_v3_gv(group, v), sort_keys=True).encode()).hexdigest()
            paths[p] = {"serverRelativeURL": f"/openapi/v3/{p}?hash={digest.upper()[:128]}"}
    return {"paths": paths}


def openapi_v3_gv(group: str, version: str) -> dict[str, Any] | None:
    rts = kinds.resources_in(group, version)
    if not rts:
        return None
    prefix = "/" + _gv_path(group, version)
    paths: dict[str, Any] = {}
    params = [
        {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
        {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
        {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": True}},
        {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
    ]
    for rt in rts:
        gvk = {"group": group, "version": version, "kind": rt.kind}
        path = (
            f"{prefix}/namespaces/{{namespace}}/{rt.plural}/{{name}}"
            if rt.namespaced
            else f"{prefix}/{rt.plural}/{{name}}"
        )
        op = {
            "operationId": f"patch{rt.kind}",
            "parameters": params,
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": gvk,
            "responses": {"200": {"description": "OK"}},
        }
        paths[path] = {"patch": op}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": {}},
    }
