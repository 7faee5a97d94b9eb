"""``meta.k8s.io/v1 Table`` rendering, so ``kubectl get`` prints the usual columns.

kubectl asks for ``application/json;as=Table;g=meta.k8s.io;v=v1`` and prints the rows as
given; each row carries the object's metadata (PartialObjectMetadata) for ``-A``,
``--show-labels`` and ``-L``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .kinds import ResourceType

Column = tuple[str, str, Callable[[dict[str, Any]], Any]]


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def _last_seen(obj: dict[str, Any]) -> str:
    ts = (
        obj.get("lastTimestamp")
        or obj.get("eventTime")
        or (obj.get("metadata") or {}).get("creationTimestamp")
    )
    return _age({"metadata": {"creationTimestamp": str(ts)[:19] + "Z" if ts else None}})


def _age(obj: dict[str, Any]) -> str:
    ts = (obj.get("metadata") or {}).get("creationTimestamp")
    if not ts:
        return "<unknown>"
    try:
        then = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    s = int((datetime.now(UTC) - then).total_seconds())
    if s < 120:
        return f"{s}s"
    if s < 3600 * 2:
        return f"{s // 60}m"
    if s < 86400 * 2:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _ports(obj: dict[str, Any]) -> str:
    ports = (obj.get("spec") or {}).get("ports") or []
    parts = []
    for p in ports:
        s = str(p.get("port"))
        if p.get("nodePort"):
            s += f":{p['nodePort']}"
        parts.append(f"{s}/{p.get('protocol', 'TCP')}")
    return ",".join(parts) or "<none>"


def _pod_ready(obj: dict[str, Any]) -> str:
    statuses = (obj.get("status") or {}).get("containerStatuses") or []
    total = len((obj.get("spec") or {}).get("containers") or [])
    ready = sum(1 for s in statuses if s.get("ready"))
    return f"{ready}/{total}"


def _pod_restarts(obj: dict[str, Any]) -> int:
    return sum(
        int(s.get("restartCount", 0)) for s in (obj.get("status") or {}).get("containerStatuses") or []
    )


def _pod_status(obj: dict[str, Any]) -> str:
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    status = obj.get("status") or {}
    for s in status.get("containerStatuses") or []:
        waiting = (s.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])
    return str(status.get("reason") or status.get("phase") or "Unknown")


def _st(obj: dict[str, Any], key: str) -> Any:
    return (obj.get("status") or {}).get(key, 0)


def _selector(obj: dict[str, Any]) -> str:
    sel = (obj.get("spec") or {}).get("selector") or {}
    if "matchLabels" in sel:
        sel = sel["matchLabels"]
    return ",".join(f"{k}={v}" for k, v in sel.items()) or "<none>"


def _condition(obj: dict[str, Any], kind: str) -> str:
    """``.status.conditions[?(@.type==kind)].status`` as the CRD's printer column (empty if absent)."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return str(c.get("status", ""))
    return ""


def _gateway_addresses(obj: dict[str, Any]) -> str:
    return ",".join(str(a.get("value")) for a in (obj.get("status") or {}).get("addresses") or [])


def _name(o: dict[str, Any]) -> str:
    return str((o.get("metadata") or {}).get("name", ""))


COLUMNS: dict[str, list[Column]] = {
    "Pod": [
        ("Ready", "string", _pod_ready),
        ("Status", "string", _pod_status),
        ("Restarts", "integer", _pod_restarts),
        ("Age", "string", _age),
        ("IP", "string", lambda o: (o.get("status") or {}).get("podIP") or "<none>"),
        ("Node", "string", lambda o: (o.get("spec") or {}).get("nodeName") or "<none>"),
    ],
    "Service": [
        ("Type", "string", lambda o: (o.get("spec") or {}).get("type", "")),
        ("Cluster-IP", "string", lambda o: (o.get("spec") or {}).get("clusterIP", "")),
        ("External-IP", "string", lambda o: "<none>"),
        ("Port(s)", "string", _ports),
        ("Age", "string", _age),
        ("Selector", "string", _selector),
    ],
    "Deployment": [
        (
            "Ready",
            "string",
            lambda o: f"{_st(o, 'readyReplicas')}/{(o.get('spec') or {}).get('replicas', 0)}",
        ),
        ("Up-to-date", "integer", lambda o: _st(o, "updatedReplicas")),
        ("Available", "integer", lambda o: _st(o, "availableReplicas")),
        ("Age", "string", _age),
    ],
    "DaemonSet": [
        ("Desired", "integer", lambda o: _st(o, "desiredNumberScheduled")),
        ("Current", "integer", lambda o: _st(o, "currentNumberScheduled")),
        ("Ready", "integer", lambda o: _st(o, "numberReady")),
        ("Up-to-date", "integer", lambda o: _st(o, "updatedNumberScheduled")),
        ("Available", "integer", lambda o: _st(o, "numberAvailable")),
        (
            "Node Selector",
            "string",
            lambda o: (
                ",".join(
                    f"{k}={v}"
                    for k, v in (((o.get("spec") or {}).get("template") or {}).get("spec") or {})
                    .get("nodeSelector", {})
                    .items()
                )
                or "<none>"
            ),
        ),
        ("Age", "string", _age),
    ],
    # The Gateway API CRDs' additionalPrinterColumns.
    "Gateway": [
        ("Class", "string", lambda o: (o.get("spec") or {}).get("gatewayClassName", "")),
        ("Address", "string", _gateway_addresses),
        ("Programmed", "string", lambda o: _condition(o, "Programmed")),
        ("Age", "string", _age),
    ],
    "GatewayClass": [
        ("Controller", "string", lambda o: (o.get("spec") or {}).get("controllerName", "")),
        ("Accepted", "string", lambda o: _condition(o, "Accepted")),
        ("Age", "string", _age),
        ("Description", "string", lambda o: (o.get("spec") or {}).get("description", "")),
    ],
    "Namespace": [
        ("Status", "string", lambda o: (o.get("status") or {}).get("phase", "")),
        ("Age", "string", _age),
    ],
    "Node": [
        (
            "Status",
            "string",
            lambda o: next(
                (
                    "Ready" if c.get("status") == "True" else "NotReady"
                    for c in (o.get("status") or {}).get("conditions") or []
                    if c.get("type") == "Ready"
                ),
                "Unknown",
            ),
        ),
        ("Age", "string", _age),
    ],
    "ConfigMap": [
        ("Data", "integer", lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {})),
        ("Age", "string", _age),
    ],
    "Secret": [
        ("Type", "string", lambda o: o.get("type", "")),
        ("Data", "integer", lambda o: len(o.get("data") or {})),
        ("Age", "string", _age),
    ],
    "ServiceAccount": [
        ("Secrets", "integer", lambda o: len(o.get("secrets") or [])),
        ("Age", "string", _age),
    ],
    "ClusterRoleBinding": [
        (
            "Role",
            "string",
            lambda o: f"{(o.get('roleRef') or {}).get('kind')}/{(o.get('roleRef') or {}).get('name')}",
        ),
        ("Age", "string", _age),
    ],
    "Event": [
        ("Last Seen", "string", _last_seen),
        ("Type", "string", lambda o: o.get("type", "")),
        ("Reason", "string", lambda o: o.get("reason", "")),
        (
            "Object",
            "string",
            lambda o: (
                f"{(o.get('involvedObject') or {}).get('kind', '').lower()}/"
                f"{(o.get('involvedObject') or {}).get('name', '')}"
            ),
        ),
        ("Message", "string", lambda o: o.get("message", "")),
        ("Name", "string", _name),
    ],
}


# Columns kubectl shows only with ``-o wide``.
WIDE_ONLY = {"IP", "Node", "Selector", "Node Selector", "Description"}


def to_table(rt: ResourceType, objs: list[dict[str, Any]], rv: str) -> dict[str, Any]:
    cols = COLUMNS.get(rt.kind, [("Age", "string", _age)])
    if not any(n == "Name" for n, _, _ in cols):
        cols = [("Name", "string", _name), *cols]
    defs = [
        {
            "name": n,
            "type": t,
            "format": "name" if n == "Name" else "",
            "description": n,
            "priority": 1 if n in WIDE_ONLY or (n == "Name" and i > 0) else 0,
        }
        for i, (n, t, _) in enumerate(cols)
    ]
    rows = []
    for o in objs:
        meta = o.get("metadata") or {}
        rows.append(
            {
                "cells": [fn(o) for _, _, fn in cols],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta},
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    }
