"""Validation of objects, enough that a server-side dry run catches malformed manifests.

Returns causes as (field path, reason type, message) with the real server's wording, e.g.
``spec.template.spec.containers[0].image: Required value``.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

Cause = tuple[str, str, str]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
    "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', "
    "regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
_PORT_MSG = "must be between 1 and 65535, inclusive"


def _q(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v + '"'
    return str(v).lower() if isinstance(v, bool) else str(v)


def required(field: str, detail: str = "") -> Cause:
    return (field, "FieldValueRequired", "Required value" + (f": {detail}" if detail else ""))


def invalid(field: str, value: Any, detail: str) -> Cause:
    return (field, "FieldValueInvalid", f"Invalid value: {_q(value)}: {detail}")


def unsupported(field: str, value: Any, allowed: list[str]) -> Cause:
    return (
        field,
        "FieldValueNotSupported",
        f"Unsupported value: {_q(value)}: supported values: " + ", ".join(f'"{a}"' for a in allowed),
    )


def not_found(field: str, value: Any) -> Cause:
    return (field, "FieldValueNotFound", f"Not found: {_q(value)}")


def duplicate(field: str, value: Any) -> Cause:
    return (field, "FieldValueDuplicate", f"Duplicate value: {_q(value)}")


def check_name(kind: str, name: str | None, field: str = "metadata.name") -> list[Cause]:
    if not name:
        return []
    if kind in ("Namespace",):
        ok, msg, limit = DNS1123_LABEL.match(name), _LABEL_MSG, 63
    elif kind == "Service":
        ok, msg, limit = DNS1035_LABEL.match(name), _DNS1035_MSG, 63
    elif kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        ok, msg, limit = (
            ("/" not in name and "%" not in name and name not in (".", "..")),
            'may not contain "/"',
            253,
        )
    else:
        ok, msg, limit = DNS1123_SUBDOMAIN.match(name), _SUBDOMAIN_MSG, 253
    if len(name) > limit:
        return [invalid(field, name, f"must be no more than {limit} characters")]
    return [] if ok else [invalid(field, name, msg)]


def _qualified_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(QUALIFIED_NAME.match(name))


def check_labels(labels: Any, field: str) -> list[Cause]:
    out: list[Cause] = []
    if labels is None:
        return out
    if not isinstance(labels, dict):
        return [invalid(field, labels, "must be a map of strings")]
    for k, v in labels.items():
        if not _qualified_key(str(k)):
            out.append(
                invalid(
                    field,
                    k,
                    "name part must consist of alphanumeric characters, '-', '_' or '.', "
                    "and must start and end with an alphanumeric character",
                )
            )
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
            out.append(
                invalid(
                    f"{field}",
                    v,
                    "a valid label must be an empty string or consist of "
                    "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                    "alphanumeric character",
                )
            )
    return out


def check_metadata(kind: str, obj: dict[str, Any]) -> list[Cause]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return [required("metadata.name", "name or generateName is required")]
    out: list[Cause] = []
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        out.append(required("metadata.name", "name or generateName is required"))
    out += check_name(kind, name)
    out += check_labels(meta.get("labels"), "metadata.labels")
    ann = meta.get("annotations")
    if ann is not None and (not isinstance(ann, dict) or not all(isinstance(v, str) for v in ann.values())):
        out.append(invalid("metadata.annotations", ann, "annotations must be a map of strings"))
    return out


def _port(field: str, value: Any, allow_zero: bool = False) -> list[Cause]:
    lo = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= 65535:
        return [
            invalid(field, value, _PORT_MSG if not allow_zero else "must be between 0 and 65535, inclusive")
        ]
    return []


def _protocol(field: str, value: Any) -> list[Cause]:
    if value in (None, "TCP", "UDP", "SCTP"):
        return []
    return [unsupported(field, value, ["SCTP", "TCP", "UDP"])]


def check_container(c: Any, field: str, volumes: set[str]) -> list[Cause]:
    if not isinstance(c, dict):
        return [invalid(field, c, "must be an object")]
    out: list[Cause] = []
    name = c.get("name")
    if not name:
        out.append(required(f"{field}.name"))
    elif not DNS1123_LABEL.match(str(name)):
        out.append(invalid(f"{field}.name", name, _LABEL_MSG))
    if not c.get("image"):
        out.append(required(f"{field}.image"))
    seen_ports: set[str] = set()
    for i, p in enumerate(c.get("ports") or []):
        pf = f"{field}.ports[{i}]"
        if not isinstance(p, dict):
            out.append(invalid(pf, p, "must be an object"))
            continue
        if "containerPort" not in p:
            out.append(required(f"{pf}.containerPort"))
        else:
            out += _port(f"{pf}.containerPort", p["containerPort"])
        if "hostPort" in p:
            out += _port(f"{pf}.hostPort", p["hostPort"], allow_zero=True)
        out += _protocol(f"{pf}.protocol", p.get("protocol"))
        pname = p.get("name")
        if pname is not None:
            if not IANA_SVC_NAME.match(str(pname)) or not re.search("[a-z]", str(pname)):
                out.append(
                    invalid(
                        f"{pf}.name",
                        pname,
                        "must be no more than 15 characters and contain only lowercase alphanumerics and '-'",
                    )
                )
            elif pname in seen_ports:
                out.append(duplicate(f"{pf}.name", pname))
            seen_ports.add(str(pname))
    for i, e in enumerate(c.get("env") or []):
        ef = f"{field}.env[{i}]"
        if not isinstance(e, dict) or not e.get("name"):
            out.append(required(f"{ef}.name"))
        elif not ENV_NAME.match(str(e["name"])):
            out.append(
                invalid(
                    f"{ef}.name",
                    e["name"],
                    "a valid environment variable name must consist of "
                    "alphabetic characters, digits, '_', '-', or '.', and must not start with a digit",
                )
            )
        elif "value" in e and "valueFrom" in e:
            out.append(invalid(f"{ef}.valueFrom", "", "may not be specified when `value` is not empty"))
    for i, m in enumerate(c.get("volumeMounts") or []):
        mf = f"{field}.volumeMounts[{i}]"
        if not isinstance(m, dict):
            out.append(invalid(mf, m, "must be an object"))
            continue
        if not m.get("name"):
            out.append(required(f"{mf}.name"))
        elif m["name"] not in volumes:
            out.append(not_found(f"{mf}.name", m["name"]))
        if not m.get("mountPath"):
            out.append(required(f"{mf}.mountPath"))
    return out


def check_pod_spec(spec: Any, field: str, template: bool = False) -> list[Cause]:
    if not isinstance(spec, dict):
        return [required(field)]
    out: list[Cause] = []
    volumes: set[str] = set()
    for i, v in enumerate(spec.get("volumes") or []):
        vf = f"{field}.volumes[{i}]"
        if not isinstance(v, dict) or not v.get("name"):
            out.append(required(f"{vf}.name"))
            continue
        if not DNS1123_LABEL.match(str(v["name"])):
            out.append(invalid(f"{vf}.name", v["name"], _LABEL_MSG))
        if v["name"] in volumes:
            out.append(duplicate(f"{vf}.name", v["name"]))
        volumes.add(v["name"])
        sources = [k for k in v if k != "name"]
        if len(sources) > 1:
            out.append(
                (
                    f"{vf}.{sources[1]}",
                    "FieldValueForbidden",
                    "Forbidden: may not specify more than 1 volume type",
                )
            )
        if "hostPath" in v and not (v.get("hostPath") or {}).get("path"):
            out.append(required(f"{vf}.hostPath.path"))
    containers = spec.get("containers")
    if not containers:
        out.append(required(f"{field}.containers"))
    names: set[str] = set()
    for key in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(key) or []):
            out += check_container(c, f"{field}.{key}[{i}]", volumes)
            if isinstance(c, dict) and c.get("name"):
                if c["name"] in names:
                    out.append(duplicate(f"{field}.{key}[{i}].name", c["name"]))
                names.add(c["name"])
    rp = spec.get("restartPolicy")
    if rp is not None and rp not in ("Always", "OnFailure", "Never"):
        out.append(unsupported(f"{field}.restartPolicy", rp, ["Always", "OnFailure", "Never"]))
    dns = spec.get("dnsPolicy")
    if dns is not None and dns not in ("ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"):
        out.append(
            unsupported(
                f"{field}.dnsPolicy", dns, ["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"]
            )
        )
    return out


def _check_workload(kind: str, obj: dict[str, Any]) -> list[Cause]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [required("spec")]
    out: list[Cause] = []
    sel = spec.get("selector")
    tmpl = spec.get("template") or {}
    tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
    if not sel or not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        if sel is None:
            out.append(required("spec.selector"))
        else:
            out.append(
                (
                    "spec.selector",
                    "FieldValueInvalid",
                    f"Invalid value: {sel!r}: empty selector is invalid for {kind.lower()}",
                )
            )
    else:
        from .selectors import match_label_selector_object

        out += check_labels(sel.get("matchLabels"), "spec.selector.matchLabels")
        if not match_label_selector_object(sel, tlabels):
            labels_txt = "map[" + " ".join(f"{k}:{v}" for k, v in sorted(tlabels.items())) + "]"
            out.append(
                (
                    "spec.template.metadata.labels",
                    "FieldValueInvalid",
                    f"Invalid value: {labels_txt}: `selector` does not match template `labels`",
                )
            )
    out += check_labels(tlabels, "spec.template.metadata.labels")
    if not tmpl:
        out.append(required("spec.template"))
    else:
        out += check_pod_spec(tmpl.get("spec"), "spec.template.spec", template=True)
        rp = (tmpl.get("spec") or {}).get("restartPolicy")
        if rp not in (None, "Always") and kind != "Job":
            out.append(unsupported("spec.template.spec.restartPolicy", rp, ["Always"]))
    replicas = spec.get("replicas")
    if replicas is not None and (not isinstance(replicas, int) or replicas < 0):
        out.append(invalid("spec.replicas", replicas, "must be greater than or equal to 0"))
    return out


def _check_service(obj: dict[str, Any], service_cidr_contains: Any) -> list[Cause]:
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return [required("spec")]
    out: list[Cause] = []
    stype = spec.get("type", "ClusterIP")
    types = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]
    if stype not in types:
        out.append(unsupported("spec.type", stype, types))
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and stype != "ExternalName" and not headless:
        out.append(required("spec.ports"))
    names: set[str] = set()
    for i, p in enumerate(ports):
        pf = f"spec.ports[{i}]"
        if not isinstance(p, dict):
            out.append(invalid(pf, p, "must be an object"))
            continue
        if len(ports) > 1 and not p.get("name"):
            out.append(required(f"{pf}.name"))
        if p.get("name"):
            if p["name"] in names:
                out.append(duplicate(f"{pf}.name", p["name"]))
            names.add(p["name"])
        if "port" not in p:
            out.append(required(f"{pf}.port"))
        else:
            out += _port(f"{pf}.port", p["port"])
        tp = p.get("targetPort")
        if isinstance(tp, int) and not isinstance(tp, bool):
            out += _port(f"{pf}.targetPort", tp)
        elif isinstance(tp, str) and not (IANA_SVC_NAME.match(tp) and re.search("[a-z]", tp)):
            if tp.isdigit():
                out += _port(f"{pf}.targetPort", int(tp))
            else:
                out.append(
                    invalid(
                        f"{pf}.targetPort",
                        tp,
                        "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
                    )
                )
        if "nodePort" in p:
            out += _port(f"{pf}.nodePort", p["nodePort"], allow_zero=True)
        out += _protocol(f"{pf}.protocol", p.get("protocol"))
    cip = spec.get("clusterIP")
    if cip not in (None, "", "None") and not service_cidr_contains(cip):
        out.append(
            invalid(
                "spec.clusterIPs",
                [cip],
                "failed to allocate IP "
                + str(cip)
                + ": provided IP is not in the valid range. The range of valid IPs is the service CIDR",
            )
        )
    out += check_labels(spec.get("selector"), "spec.selector")
    return out


def _check_rbac(kind: str, obj: dict[str, Any]) -> list[Cause]:
    out: list[Cause] = []
    if kind in ("ClusterRole", "Role"):
        for i, r in enumerate(obj.get("rules") or []):
            rf = f"rules[{i}]"
            if not isinstance(r, dict):
                out.append(invalid(rf, r, "must be an object"))
                continue
            if not r.get("verbs"):
                out.append(required(f"{rf}.verbs", "verbs must contain at least one value"))
            if r.get("resources") and r.get("apiGroups") is None:
                out.append(required(f"{rf}.apiGroups", "resource rules must supply at least one api group"))
            if r.get("nonResourceURLs") and kind == "Role":
                out.append(
                    invalid(
                        f"{rf}.nonResourceURLs",
                        r["nonResourceURLs"],
                        "namespaced rules cannot apply to non-resource URLs",
                    )
                )
    else:
        ref = obj.get("roleRef")
        if not isinstance(ref, dict):
            out.append(required("roleRef"))
        else:
            if not ref.get("name"):
                out.append(required("roleRef.name"))
            allowed = ["ClusterRole"] if kind == "ClusterRoleBinding" else ["ClusterRole", "Role"]
            if ref.get("kind") not in allowed:
                out.append(unsupported("roleRef.kind", ref.get("kind"), allowed))
            if ref.get("apiGroup") != "rbac.authorization.k8s.io":
                out.append(
                    unsupported("roleRef.apiGroup", ref.get("apiGroup"), ["rbac.authorization.k8s.io"])
                )
        for i, s in enumerate(obj.get("subjects") or []):
            sf = f"subjects[{i}]"
            if not isinstance(s, dict) or not s.get("name"):
                out.append(required(f"{sf}.name"))
                continue
            if s.get("kind") not in ("ServiceAccount", "User", "Group"):
                out.append(unsupported(f"{sf}.kind", s.get("kind"), ["Group", "ServiceAccount", "User"]))
            if s.get("kind") == "ServiceAccount" and kind == "ClusterRoleBinding" and not s.get("namespace"):
                out.append(required(f"{sf}.namespace"))
    return out


def _check_data(kind: str, obj: dict[str, Any]) -> list[Cause]:
    out: list[Cause] = []
    for section in ("data", "binaryData", "stringData"):
        data = obj.get(section)
        if data is None:
            continue
        if not isinstance(data, dict):
            out.append(invalid(section, data, "must be a map"))
            continue
        for k, v in data.items():
            if not CONFIG_KEY.match(str(k)):
                out.append(
                    invalid(
                        f"{section}[{k}]",
                        k,
                        "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                    )
                )
            if (kind == "Secret" and section == "data") or section == "binaryData":
                try:
                    base64.b64decode(str(v), validate=True)
                except (binascii.Error, ValueError):
                    out.append(invalid(f"{section}[{k}]", "<value omitted>", "illegal base64 data"))
            elif not isinstance(v, str):
                out.append(invalid(f"{section}[{k}]", v, "must be a string"))
    return out


def _check_gateway_api(obj: dict[str, Any]) -> list[Cause]:
    """The Gateway API CRD's OpenAPI checks (unknown fields were pruned or refused before)."""
    from kmeshctl import gatewayschema

    out: list[Cause] = []
    for p in gatewayschema.problems(obj):
        if p.unknown:
            continue
        if p.message.endswith("Required value"):
            out.append(required(p.path))
        elif "Duplicate value" in p.message:
            out.append(duplicate(p.path, {"name": p.value}))
        else:
            out.append(invalid(p.path, p.value, p.message))
    return out


def validate(kind: str, obj: dict[str, Any], service_cidr_contains: Any = None) -> list[Cause]:
    """All problems with ``obj`` of ``kind`` (empty list: valid)."""
    out = check_metadata(kind, obj)
    if kind == "Pod":
        out += check_pod_spec(obj.get("spec"), "spec")
    elif kind in ("Deployment", "DaemonSet", "ReplicaSet", "StatefulSet"):
        out += _check_workload(kind, obj)
    elif kind == "Service":
        out += _check_service(obj, service_cidr_contains or (lambda ip: True))
    elif kind in ("ClusterRole", "Role", "ClusterRoleBinding", "RoleBinding"):
        out += _check_rbac(kind, obj)
    elif kind in ("ConfigMap", "Secret"):
        out += _check_data(kind, obj)
    elif kind == "GatewayClass":
        out += _check_gateway_api(obj)
    elif kind in ("EnvoyFilter", "VirtualService", "DestinationRule", "Gateway"):
        spec = obj.get("spec")
        if spec is not None and not isinstance(spec, dict):
            out.append(invalid("spec", spec, "must be an object"))
        if kind == "Gateway":
            out += _check_gateway_api(obj)
        if kind == "DestinationRule" and isinstance(spec, dict) and not spec.get("host"):
            out.append(required("spec.host"))
    return out
