"""Field ownership (``metadata.managedFields``) and server-side apply.

A field set is a set of paths; each path is a tuple of FieldsV1 elements: ``f:<field>`` for a
map key, ``k:{"<key>":<value>}`` for an item of an associative list (merged by key, as for
strategic merge) and ``v:<json>`` for an item of a set list (finalizers). Leaves are scalars,
atomic lists and empty maps; associative list items are recorded as paths of their own so
that dropping an item from an applied config removes it.

Semantics kept from the real field manager:
- apply by manager M: a field M sets that another manager owns with a *different* value is a
  conflict (409) unless ``force``; with force the other manager loses it. Equal values become
  co-owned. Fields M owned before and no longer applies are removed from the object unless
  another manager still owns them (or something below them).
- update/patch/create by manager U: U takes the fields it changed; others lose them.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError
from .patching import MERGE_KEYS, SET_LISTS, merge_key_for

Path = tuple[str, ...]
MISSING = object()

_META_SKIP = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "generateName",
}


def _assoc_key(field: str, items: list[Any], builtin: bool) -> str | None:
    if not builtin:
        return None
    if field != "ports" and field not in MERGE_KEYS:
        return None
    key = merge_key_for(field, items)
    if key and all(isinstance(x, dict) and key in x for x in items):
        return key
    return None


def _item_elem(key: str, value: Any) -> str:
    return "k:" + json.dumps({key: value}, separators=(",", ":"), sort_keys=True)


def field_set(obj: dict[str, Any], builtin: bool, subresource: str = "") -> set[Path]:
    """Owned-field paths of an object (spec/metadata for the main resource, status for /status)."""
    out: set[Path] = set()
    for k, v in obj.items():
        if k in ("apiVersion", "kind"):
            continue
        if subresource == "status":
            if k != "status":
                continue
        elif k == "status":
            continue
        if k == "metadata" and isinstance(v, dict):
            v = {mk: mv for mk, mv in v.items() if mk not in _META_SKIP}
            if not v:
                continue
        _walk(("f:" + k,), k, v, builtin, out)
    return out


def _walk(prefix: Path, field: str, v: Any, builtin: bool, out: set[Path]) -> None:
    if isinstance(v, dict) and v:
        for k, sub in v.items():
            _walk(prefix + ("f:" + k,), k, sub, builtin, out)
        return
    if isinstance(v, list) and not v and builtin and (field in MERGE_KEYS or field == "ports"):
        return  # an empty associative list owns no items
    if isinstance(v, list) and v:
        if field in SET_LISTS and all(not isinstance(x, (dict, list)) for x in v):
            for x in v:
                out.add(prefix + ("v:" + json.dumps(x),))
            return
        key = _assoc_key(field, v, builtin)
        if key:
            for item in v:
                ipath = prefix + (_item_elem(key, item[key]),)
                out.add(ipath)
                for k, sub in item.items():
                    _walk(ipath + ("f:" + k,), k, sub, builtin, out)
            return
    out.add(prefix)


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for p in sorted(paths):
        node = root
        for elem in p:
            node = node.setdefault(elem, {})
    # Mark nodes that are owned themselves and have children with ".".
    for p in paths:
        node = root
        for elem in p:
            node = node[elem]
        if node and "." not in node:
            node["."] = {}
    return root


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for elem, sub in (tree or {}).items():
        if elem == ".":
            out.add(prefix)
            continue
        p = prefix + (elem,)
        if sub:
            out |= from_fields_v1(sub, p)
        else:
            out.add(p)
    return out


def get_path(obj: Any, path: Path) -> Any:
    cur = obj
    for elem in path:
        kind, _, rest = elem.partition(":")
        if kind == "f":
            if not isinstance(cur, dict) or rest not in cur:
                return MISSING
            cur = cur[rest]
        elif kind == "k":
            if not isinstance(cur, list):
                return MISSING
            ((key, value),) = json.loads(rest).items()
            cur = next((x for x in cur if isinstance(x, dict) and x.get(key) == value), MISSING)
            if cur is MISSING:
                return MISSING
        elif kind == "v":
            value = json.loads(rest)
            if not isinstance(cur, list) or value not in cur:
                return MISSING
            cur = value
        else:
            return MISSING
    return cur


def remove_path(obj: Any, path: Path) -> None:
    if not path:
        return
    parent = get_path(obj, path[:-1])
    if parent is MISSING:
        return
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif kind == "k" and isinstance(parent, list):
        ((key, value),) = json.loads(rest).items()
        parent[:] = [x for x in parent if not (isinstance(x, dict) and x.get(key) == value)]
    elif kind == "v" and isinstance(parent, list):
        value = json.loads(rest)
        parent[:] = [x for x in parent if x != value]


def _prune_empty_parents(obj: dict[str, Any], path: Path) -> None:
    """Remove maps/lists left empty by a removal (as SSA does), up to the second level."""
    for i in range(len(path) - 1, 1, -1):
        parent = get_path(obj, path[:i])
        if parent is MISSING or parent:
            return
        remove_path(obj, path[:i])


def merge_applied(current: Any, config: Any, field: str, builtin: bool) -> Any:
    """Overlay an applied config on the live object (maps merge, keyed lists merge, others replace)."""
    if isinstance(config, dict):
        out = copy.deepcopy(current) if isinstance(current, dict) else {}
        for k, v in config.items():
            out[k] = merge_applied(out.get(k), v, k, builtin)
        return out
    if isinstance(config, list) and isinstance(current, list):
        if field in SET_LISTS:
            return list(current) + [x for x in config if x not in current]
        key = _assoc_key(field, config or current, builtin)
        if key and all(isinstance(x, dict) and key in x for x in current):
            out_list = [copy.deepcopy(x) for x in current]
            for item in config:
                idx = next((i for i, x in enumerate(out_list) if x.get(key) == item[key]), None)
                if idx is None:
                    out_list.append(copy.deepcopy(item))
                else:
                    out_list[idx] = merge_applied(out_list[idx], item, "", builtin)
            return out_list
    return copy.deepcopy(config)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Managers:
    """The managedFields of one object as editable field sets."""

    def __init__(self, managed: list[dict[str, Any]] | None) -> None:
        self.entries: list[dict[str, Any]] = []
        for e in managed or []:
            entry = {k: v for k, v in e.items() if k != "fieldsV1"}
            entry["_set"] = from_fields_v1(e.get("fieldsV1") or {})
            self.entries.append(entry)

    def _entry(self, manager: str, operation: str, api_version: str, subresource: str) -> dict[str, Any]:
        for e in self.entries:
            if (e.get("manager"), e.get("operation"), e.get("subresource", "")) == (
                manager,
                operation,
                subresource,
            ):
                return e
        e = {"manager": manager, "operation": operation, "apiVersion": api_version, "_set": set()}
        if subresource:
            e["subresource"] = subresource
        self.entries.append(e)
        return e

    def others(self, manager: str, operation: str, subresource: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.entries
            if (e.get("manager"), e.get("operation"), e.get("subresource", ""))
            != (manager, operation, subresource)
        ]

    def render(self) -> list[dict[str, Any]]:
        out = []
        for e in self.entries:
            if not e["_set"]:
                continue
            r = {k: v for k, v in e.items() if k != "_set"}
            r["fieldsType"] = "FieldsV1"
            r["fieldsV1"] = to_fields_v1(e["_set"])
            out.append(r)
        return out


def _describe(path: Path) -> str:
    parts = []
    for elem in path:
        kind, _, rest = elem.partition(":")
        if kind == "f":
            parts.append("." + rest)
        elif kind == "k":
            parts.append("[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items()) + "]")
        else:
            parts.append(f"[{rest}]")
    return "".join(parts)


def _owned_below(entries: list[dict[str, Any]], path: Path) -> bool:
    n = len(path)
    return any(p[:n] == path for e in entries for p in e["_set"])


def server_side_apply(
    current: dict[str, Any] | None,
    config: dict[str, Any],
    manager: str,
    force: bool,
    builtin: bool,
    api_version: str,
    subresource: str = "",
) -> dict[str, Any]:
    """Return the object after applying ``config`` as ``manager`` (raises 409 on conflicts)."""
    applied = field_set(config, builtin, subresource)
    if current is None:
        new = copy.deepcopy(config)
        mgrs = Managers(None)
    else:
        mgrs = Managers((current.get("metadata") or {}).get("managedFields"))
        others = mgrs.others(manager, "Apply", subresource)
        conflicts: list[tuple[str, Path]] = []
        for e in others:
            for p in applied & e["_set"]:
                cur_v, new_v = get_path(current, p), get_path(config, p)
                if p[-1].startswith("k:") and isinstance(cur_v, dict):
                    continue  # list item node itself: only its leaves can conflict
                if cur_v != new_v:
                    conflicts.append((e["manager"], p))
        if conflicts and not force:
            raise _conflict_error(conflicts, api_version)
        if force:
            for e in others:
                e["_set"] -= applied
        mine = mgrs._entry(manager, "Apply", api_version, subresource)
        previously = set(mine["_set"])
        section = {k: v for k, v in config.items() if (k == "status") == (subresource == "status")}
        new = merge_applied(current, section, "", builtin)
        for k in ("apiVersion", "kind"):
            if k in config:
                new[k] = config[k]
        dropped = {p for p in previously - applied if not _owned_below(others, p)}
        for p in sorted(dropped, key=len):
            if not any(p[:i] in dropped for i in range(1, len(p))):  # an ancestor goes anyway
                remove_path(new, p)
                _prune_empty_parents(new, p)
    entry = mgrs._entry(manager, "Apply", api_version, subresource)
    entry["_set"] = applied
    entry["time"] = _now()
    new.setdefault("metadata", {})["managedFields"] = mgrs.render()
    return new


def _conflict_error(conflicts: list[tuple[str, Path]], api_version: str) -> ApiError:
    n = len(conflicts)
    lines = [f'conflict with "{m}": {_describe(p)}' for m, p in conflicts]
    if n == 1:
        msg = f"Apply failed with 1 conflict: {lines[0]}"
    else:
        msg = f"Apply failed with {n} conflicts: " + "\n".join(lines)
    causes = [
        {"reason": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": _describe(p)}
        for m, p in conflicts
    ]
    return ApiError(409, "Conflict", msg, {"causes": causes})


def record_update(
    old: dict[str, Any] | None,
    new: dict[str, Any],
    manager: str,
    builtin: bool,
    api_version: str,
    subresource: str = "",
) -> None:
    """Give ``manager`` (operation Update) the fields it changed between old and new, in place."""
    base = (old or {}).get("metadata", {}).get("managedFields") if old else None
    mgrs = Managers(base)
    new_fields = field_set(new, builtin, subresource)
    old_fields = field_set(old, builtin, subresource) if old else set()
    changed = {p for p in new_fields if old is None or get_path(old, p) != get_path(new, p)}
    removed = old_fields - new_fields
    if not changed and not removed:
        new.setdefault("metadata", {})["managedFields"] = mgrs.render() if base else base or []
        if not new["metadata"]["managedFields"]:
            new["metadata"].pop("managedFields")
        return
    for e in mgrs.others(manager, "Update", subresource):
        if e.get("subresource", "") != subresource:
            continue  # new_fields covers this subresource only: other sections are untouched
        e["_set"] = {p for p in e["_set"] if p not in changed and p in new_fields}
    mine = mgrs._entry(manager, "Update", api_version, subresource)
    mine["_set"] = {p for p in mine["_set"] if p in new_fields} | changed
    mine["time"] = _now()
    rendered = mgrs.render()
    if rendered:
        new.setdefault("metadata", {})["managedFields"] = rendered
    else:
        new.get("metadata", {}).pop("managedFields", None)
