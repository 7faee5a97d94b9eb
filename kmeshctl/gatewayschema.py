"""Offline validation of Gateway API v1 objects (Gateway, GatewayClass) against our schema.

kubernetes-validate ships the built-in kinds only, so the fields of the Gateway API v1 CRDs
that we emit or serve are described in ``schemas/gateway-api-v1.yaml``. ``problems`` lists
what a real API server would refuse: unknown fields (dropped, or 400 with strict field
validation), and values outside the CRD's types, bounds and patterns (422), plus the CRD's
list-map key rule (listener names are unique).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_FILE = Path(__file__).with_name("schemas") / "gateway-api-v1.yaml"
KINDS = ("Gateway", "GatewayClass")


@dataclass(frozen=True)
class Problem:
    """One schema violation; ``unknown`` ones are fields the CRD does not define."""

    path: str  # e.g. spec.listeners[0].port
    message: str
    value: Any = None
    unknown: bool = False
    parent: Any = None  # the object holding an unknown field (for pruning)
    key: str = ""


@functools.lru_cache(maxsize=4)
def _validator(kind: str) -> Any:
    import jsonschema
    import yaml

    doc = yaml.safe_load(SCHEMA_FILE.read_text())
    return jsonschema.validators.Draft202012Validator(doc[kind])


def _path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _message(err: Any, where: str) -> str:
    v = err.validator
    if v == "minimum":
        return f"{where} in body should be greater than or equal to {err.validator_value}"
    if v == "maximum":
        return f"{where} in body should be less than or equal to {err.validator_value}"
    if v == "pattern":
        return f"{where} in body should match '{err.validator_value}'"
    if v == "maxLength":
        return f"{where} in body may not be longer than {err.validator_value}"
    if v == "minLength":
        return f"{where} in body should be at least {err.validator_value} chars long"
    if v == "enum":
        return f"{where} in body should be one of {err.validator_value}"
    if v == "type":
        return f"{where} in body must be of type {err.validator_value}: {_found(err.instance)}"
    if v in ("minItems", "maxItems"):
        word = "at least" if v == "minItems" else "at most"
        return f"{where} in body should have {word} {err.validator_value} items"
    return f"{where}: {err.message}"


def _found(value: Any) -> str:
    if isinstance(value, bool):
        return '"boolean"'
    if isinstance(value, int):
        return '"integer"'
    if isinstance(value, float):
        return '"number"'
    if isinstance(value, str):
        return '"string"'
    if isinstance(value, list):
        return '"array"'
    if isinstance(value, dict):
        return '"object"'
    return '"null"'


def problems(obj: dict[str, Any]) -> list[Problem]:
    """Every violation of the v1 schema of ``obj['kind']`` (empty: valid)."""
    kind = obj.get("kind")
    if kind not in KINDS:
        return [Problem("kind", f"kind {kind!r} is not a Gateway API v1 kind ({', '.join(KINDS)})", kind)]
    out: list[Problem] = []
    for err in sorted(_validator(kind).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = set((err.schema.get("properties") or {}).keys())
            for k in err.instance:
                if k not in known:
                    out.append(Problem(_path([*where, k]), f'unknown field "{_path([*where, k])}"',
                                       unknown=True, parent=err.instance, key=k))
        elif err.validator == "required":
            missing = str(err.message).split("'")[1] if "'" in err.message else str(err.message)
            path = _path([*where, missing])
            out.append(Problem(path, f"{path}: Required value"))
        else:
            path = _path(where) or kind
            out.append(Problem(path, _message(err, path), err.instance))
    spec = obj.get("spec")
    if kind == "Gateway" and isinstance(spec, dict) and isinstance(spec.get("listeners"), list):
        seen: set[Any] = set()
        for i, listener in enumerate(spec["listeners"]):
            name = listener.get("name") if isinstance(listener, dict) else None
            if name is not None and name in seen:
                path = f"spec.listeners[{i}]"
                detail = f'map[string]interface {{}}{{"name":"{name}"}}'
                out.append(Problem(path, f"{path}: Duplicate value: {detail}", name))
            seen.add(name)
    return out


def check(obj: dict[str, Any]) -> None:
    """Raise ValueError naming the first violation (for kmeshctl's own generated objects)."""
    found = problems(obj)
    if found:
        raise ValueError("; ".join(p.message for p in found[:3]))
