"""The three PATCH formats: JSON merge (RFC 7386), JSON patch (RFC 6902), strategic merge.

Strategic merge follows Kubernetes' rules for the built-in kinds we serve: lists of
containers/env/volumes/ports/... merge by their merge key; other lists replace. Directives
``$patch: replace|delete|merge``, ``$deleteFromPrimitiveList/<field>``, ``$setElementOrder/<field>``
and ``$retainKeys`` are understood.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import bad_request

# Field name -> merge key, for built-in kinds (k8s.io/api patchMergeKey tags).
MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "conditions": "type",
    "ownerReferences": "uid",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "readinessGates": "conditionType",
}
# Lists of scalars merged as sets.
SET_LISTS = {"finalizers"}


def merge_key_for(field: str, items: list[Any]) -> str | None:
    """The merge key of a list field; ``ports`` depends on whether it is a container's or a service's."""
    if field == "ports":
        for it in items:
            if isinstance(it, dict):
                return "containerPort" if "containerPort" in it else "port"
        return "port"
    return MERGE_KEYS.get(field)


def json_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = json_merge_patch(result.get(k), v)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
    cur = doc
    for p in parts[:-1]:
        if isinstance(cur, list):
            try:
                cur = cur[int(p)]
            except (ValueError, IndexError) as e:
                raise bad_request(
                    f"the server rejected our request due to an error in our request: {e}"
                ) from e
        elif isinstance(cur, dict) and p in cur:
            cur = cur[p]
        else:
            raise bad_request(
                f"the server rejected our request due to an error in our request: "
                f"missing path component {p!r}"
            )
    return cur, parts[-1]


def _get(doc: Any, parts: list[str]) -> Any:
    if not parts:
        return doc
    parent, last = _parent(doc, parts)
    try:
        return parent[int(last)] if isinstance(parent, list) else parent[last]
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise bad_request(
            f"the server rejected our request due to an error in our request: "
            f"path {'/'.join(parts)!r} not found"
        ) from e


def _remove(doc: Any, parts: list[str]) -> Any:
    parent, last = _parent(doc, parts)
    try:
        if isinstance(parent, list):
            return parent.pop(int(last))
        return parent.pop(last)
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise bad_request(
            f"the server rejected our request due to an error in our request: "
            f"unable to remove nonexistent key: {last}"
        ) from e


def _add(doc: Any, parts: list[str], value: Any) -> Any:
    if not parts:
        return value
    parent, last = _parent(doc, parts)
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        else:
            try:
                idx = int(last)
            except ValueError as e:
                raise bad_request(f"invalid list index {last!r}") from e
            if idx < 0 or idx > len(parent):
                raise bad_request(
                    f"the server rejected our request due to an error in our request: "
                    f"index {idx} out of bounds"
                )
            parent.insert(idx, value)
    elif isinstance(parent, dict):
        parent[last] = value
    else:
        raise bad_request(
            "the server rejected our request due to an error in our request: "
            f"cannot add to a scalar at {last!r}"
        )
    return doc


def json_patch(target: Any, ops: Any) -> Any:
    if not isinstance(ops, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid json patch operation: {op!r}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            doc = _add(doc, parts, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            _remove(doc, parts)
        elif kind == "replace":
            _get(doc, parts)
            if parts:
                parent, last = _parent(doc, parts)
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op.get("value"))
                else:
                    parent[last] = copy.deepcopy(op.get("value"))
            else:
                doc = copy.deepcopy(op.get("value"))
        elif kind == "move":
            value = _remove(doc, _pointer(op["from"]))
            doc = _add(doc, parts, value)
        elif kind == "copy":
            doc = _add(doc, parts, copy.deepcopy(_get(doc, _pointer(op["from"]))))
        elif kind == "test":
            if _get(doc, parts) != op.get("value"):
                raise ApiTestFailed(op["path"])
        else:
            raise bad_request(f"unexpected json patch operation {kind!r}")
    return doc


class ApiTestFailed(Exception):
    pass


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Apply a strategic merge patch to a built-in object."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    return _smp_map(copy.deepcopy(target) if isinstance(target, dict) else {}, patch)


def _smp_map(result: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys") or k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            cur = result.get(field)
            if isinstance(cur, list):
                result[field] = [x for x in cur if x not in (v or [])]
            continue
        if v is None:
            result.pop(k, None)
            continue
        cur = result.get(k)
        if isinstance(v, dict):
            if v.get("$patch") == "delete":
                result.pop(k, None)
            else:
                result[k] = _smp_map(cur if isinstance(cur, dict) else {}, v)
        elif isinstance(v, list):
            result[k] = _smp_list(k, cur if isinstance(cur, list) else [], v)
        else:
            result[k] = copy.deepcopy(v)
    if isinstance(retain, list):
        for k in list(result):
            if k not in retain:
                del result[k]
    return result


def _smp_list(field: str, cur: list[Any], patch: list[Any]) -> list[Any]:
    if field in SET_LISTS:
        out = list(cur)
        for x in patch:
            if x not in out:
                out.append(x)
        return out
    key = merge_key_for(field, patch + cur)
    if key is None or not all(isinstance(x, dict) for x in patch):
        return [copy.deepcopy(x) for x in patch if not (isinstance(x, dict) and "$patch" in x)]
    if any(isinstance(x, dict) and x.get("$patch") == "replace" for x in patch):
        return [copy.deepcopy(x) for x in patch if not (isinstance(x, dict) and "$patch" in x)]
    out = [copy.deepcopy(x) for x in cur]
    for item in patch:
        if key not in item:
            raise bad_request(f"map: {item!r} does not contain declared merge key: {key}")
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_smp_map({}, item))
        else:
            out[idx] = _smp_map(out[idx], item)
    return out
