"""Decoding the Kubernetes protobuf envelope for the few kinds kubectl's generators send.

``kubectl create namespace|configmap|secret|serviceaccount|deployment`` use the typed client, which
sends ``application/vnd.kubernetes.protobuf`` and does not fall back to JSON on 415. The
envelope is ``k8s\\0`` + runtime.Unknown{typeMeta, raw}; ``raw`` is the object message. Only
the fields those generators can set are decoded (field numbers from k8s.io/api generated.proto);
anything else is answered with 415 by the caller. Responses are always JSON (clients accept it).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

MAGIC = b"k8s\x00"


class ProtobufError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs; varints as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
            out.append((num, val))
        elif wire == 2:
            n, pos = _varint(buf, pos)
            out.append((num, buf[pos : pos + n]))
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    return out


def _str(v: int | bytes) -> str:
    if not isinstance(v, bytes):
        raise ProtobufError("expected a string")
    return v.decode()


def _map(entries: list[bytes], value: Callable[[bytes], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in entries:
        kv = dict(fields(e))
        out[_str(kv.get(1, b""))] = value(kv.get(2, b""))  # type: ignore[arg-type]
    return out


def _object_meta(buf: bytes) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    labels: list[bytes] = []
    annotations: list[bytes] = []
    names = {1: "name", 2: "generateName", 3: "namespace"}
    for num, v in fields(buf):
        if num in names and v:  # proto2 strings arrive even when empty: empty means unset
            meta[names[num]] = _str(v)
        elif num == 11:
            labels.append(v)  # type: ignore[arg-type]
        elif num == 12:
            annotations.append(v)  # type: ignore[arg-type]
        elif num == 14:
            meta.setdefault("finalizers", []).append(_str(v))
    if labels:
        meta["labels"] = _map(labels, lambda b: b.decode())
    if annotations:
        meta["annotations"] = _map(annotations, lambda b: b.decode())
    return meta


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _configmap(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    data: list[bytes] = []
    binary: list[bytes] = []
    for num, v in fields(buf):
        if num == 1:
            obj["metadata"] = _object_meta(v)  # type: ignore[arg-type]
        elif num == 2:
            data.append(v)  # type: ignore[arg-type]
        elif num == 3:
            binary.append(v)  # type: ignore[arg-type]
        elif num == 4:
            obj["immutable"] = bool(v)
    if data:
        obj["data"] = _map(data, lambda b: b.decode())
    if binary:
        obj["binaryData"] = _map(binary, _b64)
    return obj


def _secret(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    data: list[bytes] = []
    string_data: list[bytes] = []
    for num, v in fields(buf):
        if num == 1:
            obj["metadata"] = _object_meta(v)  # type: ignore[arg-type]
        elif num == 2:
            data.append(v)  # type: ignore[arg-type]
        elif num == 3:
            obj["type"] = _str(v)
        elif num == 4:
            string_data.append(v)  # type: ignore[arg-type]
        elif num == 5:
            obj["immutable"] = bool(v)
    if data:
        obj["data"] = _map(data, _b64)
    if string_data:
        obj["stringData"] = _map(string_data, lambda b: b.decode())
    return obj


def _namespace(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for num, v in fields(buf):
        if num == 1:
            obj["metadata"] = _object_meta(v)  # type: ignore[arg-type]
    return obj


def _service_account(buf: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for num, v in fields(buf):
        if num == 1:
            obj["metadata"] = _object_meta(v)  # type: ignore[arg-type]
        elif num == 4:
            obj["automountServiceAccountToken"] = bool(v)
    return obj


def _scalars(buf: bytes, strings: dict[int, str], ints: dict[int, str] | None = None) -> dict[str, Any]:
    """Decode the string and integer fields of a message; empty/zero values mean "not set"."""
    out: dict[str, Any] = {}
    for num, v in fields(buf):
        if num in strings and isinstance(v, bytes) and v:
            out[strings[num]] = v.decode()
        elif ints and num in ints and isinstance(v, int) and v:
            out[ints[num]] = v
    return out


def _container(buf: bytes) -> dict[str, Any]:
    c = _scalars(buf, {1: "name", 2: "image", 5: "workingDir", 14: "imagePullPolicy"})
    for num, v in fields(buf):
        if num in (3, 4) and isinstance(v, bytes):
            c.setdefault("command" if num == 3 else "args", []).append(v.decode())
        elif num == 6 and isinstance(v, bytes):
            c.setdefault("ports", []).append(
                _scalars(v, {1: "name", 4: "protocol", 5: "hostIP"}, {2: "hostPort", 3: "containerPort"})
            )
        elif num == 7 and isinstance(v, bytes):
            c.setdefault("env", []).append(_scalars(v, {1: "name", 2: "value"}))
    return c


def _pod_spec(buf: bytes) -> dict[str, Any]:
    spec = _scalars(buf, {3: "restartPolicy", 6: "dnsPolicy", 8: "serviceAccountName", 10: "nodeName"})
    for num, v in fields(buf):
        if num == 2 and isinstance(v, bytes):
            spec.setdefault("containers", []).append(_container(v))
        elif num == 11 and v:
            spec["hostNetwork"] = True
    return spec


def _label_selector(buf: bytes) -> dict[str, Any]:
    sel: dict[str, Any] = {}
    labels: list[bytes] = []
    for num, v in fields(buf):
        if num == 1 and isinstance(v, bytes):
            labels.append(v)
        elif num == 2 and isinstance(v, bytes):
            expr = _scalars(v, {1: "key", 2: "operator"})
            vals = [x.decode() for n, x in fields(v) if n == 3 and isinstance(x, bytes)]
            if vals:
                expr["values"] = vals
            sel.setdefault("matchExpressions", []).append(expr)
    if labels:
        sel["matchLabels"] = _map(labels, lambda b: b.decode())
    return sel


def _deployment(buf: bytes) -> dict[str, Any]:
    """What ``kubectl create deployment`` sets: replicas, selector, template, strategy type."""
    obj: dict[str, Any] = {}
    for num, v in fields(buf):
        if num == 1 and isinstance(v, bytes):
            obj["metadata"] = _object_meta(v)
        elif num == 2 and isinstance(v, bytes):
            spec: dict[str, Any] = {}
            for snum, sv in fields(v):
                if snum == 1 and isinstance(sv, int):
                    spec["replicas"] = sv
                elif snum == 2 and isinstance(sv, bytes):
                    spec["selector"] = _label_selector(sv)
                elif snum == 3 and isinstance(sv, bytes):
                    tmpl: dict[str, Any] = {}
                    for tnum, tv in fields(sv):
                        if tnum == 1 and isinstance(tv, bytes):
                            tmpl["metadata"] = {k: x for k, x in _object_meta(tv).items() if x}
                        elif tnum == 2 and isinstance(tv, bytes):
                            tmpl["spec"] = _pod_spec(tv)
                    spec["template"] = tmpl
                elif snum == 4 and isinstance(sv, bytes):
                    strategy = _scalars(sv, {1: "type"})
                    if strategy:
                        spec["strategy"] = strategy
            obj["spec"] = spec
    return obj


DECODERS: dict[tuple[str, str], Callable[[bytes], dict[str, Any]]] = {
    ("v1", "ConfigMap"): _configmap,
    ("v1", "Secret"): _secret,
    ("v1", "Namespace"): _namespace,
    ("v1", "ServiceAccount"): _service_account,
    ("apps/v1", "Deployment"): _deployment,
}


def decode(body: bytes) -> dict[str, Any] | None:
    """The object as JSON-shaped dict, or None when the kind is not one we decode."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf magic prefix")
    unknown = dict(fields(body[len(MAGIC) :]))
    type_meta = dict(fields(unknown.get(1, b"")))  # type: ignore[arg-type]
    api_version, kind = _str(type_meta.get(1, b"")), _str(type_meta.get(2, b""))
    decoder = DECODERS.get((api_version, kind))
    if decoder is None:
        return None
    obj = decoder(unknown.get(2, b""))  # type: ignore[arg-type]
    obj["apiVersion"], obj["kind"] = api_version, kind
    return obj
