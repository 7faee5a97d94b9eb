"""JSON-form Envoy resources -> serialized protos, with ``@type`` resolved from ``xds-protos``.

Why JSON form first: EnvoyFilter patches are written as JSON/YAML fragments and MERGE is a
structural merge, so config is built and patched as dicts and converted once, here.

An ``Any`` whose type this Python has no descriptor for (``xds-protos`` lags Envoy: e.g. the
listener ``dynamic_modules`` and ``set_filter_state`` filters) is sent as an
``xds.type.v3.TypedStruct`` carrying the same type URL and fields, which Envoy converts back
itself, exactly as it does for the TypedStruct an EnvoyFilter may carry.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from google.protobuf import descriptor_pool, json_format, symbol_database

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
_LEGACY_TYPED_STRUCTS = ("udpa.type.v1.TypedStruct", "xds.type.v3.TypedStruct")

_MESSAGES = {
    LISTENER: ("envoy.config.listener.v3.listener_pb2", "Listener"),
    CLUSTER: ("envoy.config.cluster.v3.cluster_pb2", "Cluster"),
    ENDPOINT: ("envoy.config.endpoint.v3.endpoint_pb2", "ClusterLoadAssignment"),
    ROUTE: ("envoy.config.route.v3.route_pb2", "RouteConfiguration"),
}
_tried_packages: set[str] = set()


class EncodeError(ValueError):
    """A resource or patch value is not valid Envoy config; the message says where."""


def _known(full_name: str) -> bool:
    try:
        descriptor_pool.Default().FindMessageTypeByName(full_name)
        return True
    except KeyError:
        pass
    package = full_name.rsplit(".", 1)[0]
    if package in _tried_packages:
        return False
    _tried_packages.add(package)
    try:  # xds-protos lays a proto package out as a Python package of *_pb2 modules
        mod = importlib.import_module(package)
        for info in pkgutil.iter_modules(getattr(mod, "__path__", [])):
            if info.name.endswith("_pb2"):
                importlib.import_module(f"{package}.{info.name}")
    except ImportError:
        return False
    try:
        descriptor_pool.Default().FindMessageTypeByName(full_name)
        return True
    except KeyError:
        return False


def message_class(type_url: str) -> Any:
    full = type_url.rsplit("/", 1)[-1]
    if not _known(full):
        raise EncodeError(f"unknown type {full}")
    return symbol_database.Default().GetSymbol(full)


def normalize(value: Any) -> Any:
    """Rewrite every ``Any`` of an unknown type as a TypedStruct (see module doc)."""
    if isinstance(value, list):
        return [normalize(v) for v in value]
    if not isinstance(value, dict):
        return value
    type_url = value.get("@type")
    if isinstance(type_url, str):
        full = type_url.rsplit("/", 1)[-1]
        if full in _LEGACY_TYPED_STRUCTS:
            _known(full)
            return dict(value)  # its fields are JSON for Envoy, not for us
        if not _known(full):
            fields = {k: v for k, v in value.items() if k != "@type"}
            _known("xds.type.v3.TypedStruct")
            return {"@type": TYPED_STRUCT, "type_url": type_url, "value": fields}
    return {k: normalize(v) for k, v in value.items()}


def to_message(type_url: str, value: dict[str, Any]) -> Any:
    """Parse JSON form into the message of ``type_url``; raises EncodeError naming the problem."""
    if type_url in _MESSAGES:
        mod, name = _MESSAGES[type_url]
        cls = getattr(importlib.import_module(mod), name)
    else:
        cls = message_class(type_url)
    try:
        return json_format.ParseDict(normalize(value), cls(), ignore_unknown_fields=False)
    except json_format.ParseError as e:
        raise EncodeError(str(e)) from e


def serialize(type_url: str, value: dict[str, Any]) -> bytes:
    return to_message(type_url, value).SerializeToString()
