"""Schema checks of built-in kinds against the Kubernetes OpenAPI (JSON schema) definitions.

The real server decodes a body into Go structs: a wrong JSON type is a 400, and with
``fieldValidation=Strict`` (kubectl's default) so is an unknown field. We reproduce both with
the JSON schemas shipped in the ``kubernetes-validate`` package. When that package is not
installed the checks are skipped (the server still applies its own semantic validation).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

from .errors import ApiError
from .kinds import ResourceType

log = logging.getLogger("sandbox.apiserver")
SCHEMA_VERSION = "1.32"


@functools.lru_cache(maxsize=128)
def _validator(kind: str, api_version: str, strict: bool) -> Any:
    try:
        import jsonschema
        from kubernetes_validate import utils
        from referencing import Registry, Resource
    except ImportError:
        log.info("kubernetes-validate is not installed: schema checks are skipped")
        return None
    version = [v for v in utils.all_versions() if utils.major_minor(v) <= SCHEMA_VERSION][-1]
    schema_dir = f"v{version}-local" + ("-strict" if strict else "")
    group_version = api_version.split("/")
    gv = (
        f"{group_version[0].split('.')[0]}-{group_version[1]}"
        if len(group_version) == 2
        else group_version[0]
    )
    try:
        schema = utils.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{gv}.json", version
        )
        defs = utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    except (FileNotFoundError, utils.VersionNotSupportedError):
        return None
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_JSON_TYPES = {
    "string": "string",
    "integer": "number",
    "number": "number",
    "boolean": "bool",
    "object": "object",
    "array": "array",
}


def _found(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


GATEWAY_GROUP = "gateway.networking.k8s.io"


def _check_gateway_api(obj: dict[str, Any], strict: bool) -> None:
    """CRD structural pruning: unknown fields are a 400 when strict, else dropped (values: validation)."""
    from kmeshctl import gatewayschema

    unknown = [p for p in gatewayschema.problems(obj) if p.unknown]
    if unknown and strict:
        fields = ", ".join(f'unknown field "{p.path}"' for p in sorted(unknown, key=lambda p: p.path))
        raise ApiError(400, "BadRequest", f"strict decoding error: {fields}")
    for p in unknown:
        p.parent.pop(p.key, None)


def check(rt: ResourceType, obj: dict[str, Any], strict: bool) -> None:
    """Raise 400 for wrong JSON types; unknown fields: 400 when ``strict``, else dropped in place."""
    if rt.group == GATEWAY_GROUP:
        _check_gateway_api(obj, strict)
        return
    if not rt.builtin:
        return
    validator = _validator(rt.kind, obj.get("apiVersion") or rt.api_version(rt.versions[0]), True)
    if validator is None:
        return
    unknown: list[str] = []
    prune: list[tuple[dict[str, Any], str]] = []
    for err in validator.iter_errors(obj):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            known = set((err.schema.get("properties") or {}).keys())
            unknown += [_path([*where, k]) for k in err.instance if k not in known]
            prune += [(err.instance, k) for k in err.instance if k not in known]
        elif err.validator == "type":
            expected = err.validator_value
            expected = [t for t in (expected if isinstance(expected, list) else [expected]) if t != "null"]
            raise ApiError(
                400,
                "BadRequest",
                f'{rt.kind} in version "{obj.get("apiVersion", "").rsplit("/", 1)[-1]}" cannot be '
                f"handled as a {rt.kind}: json: cannot unmarshal {_found(err.instance)} into Go "
                f"struct field {_path(where)} of type {'/'.join(expected) or 'object'}",
            )
    if unknown and strict:
        fields = ", ".join(f'unknown field "{u}"' for u in sorted(set(unknown)))
        raise ApiError(400, "BadRequest", f"strict decoding error: {fields}")
    for parent, key in prune:  # Warn/Ignore: the Go decoder drops what it does not know
        parent.pop(key, None)
