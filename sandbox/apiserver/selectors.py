"""Label and field selectors with the real API server's syntax.

Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``,
comma-separated (AND). Field selectors: ``path=value``, ``path==value``, ``path!=value`` where
path is a dotted JSON path (metadata.name, metadata.namespace, spec.nodeName, status.phase,
involvedObject.name ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import bad_request

Predicate = Callable[[dict[str, Any]], bool]

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_TOKEN = re.compile(
    r"\s*(?:"
    r"(?P<notexists>!\s*(?P<nk>" + _KEY + r"))"
    r"|(?P<setop>(?P<sk>" + _KEY + r")\s+(?P<op>in|notin)\s*\((?P<vals>[^)]*)\))"
    r"|(?P<cmp>(?P<ck>" + _KEY + r")\s*(?P<cop>==|!=|=)\s*(?P<cv>[-A-Za-z0-9_.]*))"
    r"|(?P<exists>(?P<ek>" + _KEY + r"))"
    r")\s*(?:,|$)"
)


def parse_label_selector(text: str | None) -> Predicate:
    """Compile a label selector into a predicate on an object's metadata.labels."""
    if not text or not text.strip():
        return lambda obj: True
    clauses: list[Callable[[dict[str, str]], bool]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise bad_request(f'unable to parse requirement: invalid label selector: "{text}"')
        pos = m.end()
        if m.group("notexists"):
            k = m.group("nk")
            clauses.append(lambda labels, k=k: k not in labels)
        elif m.group("setop"):
            k, op = m.group("sk"), m.group("op")
            vals = {v.strip() for v in m.group("vals").split(",") if v.strip()}
            if op == "in":
                clauses.append(lambda labels, k=k, vals=vals: labels.get(k) in vals)
            else:
                clauses.append(lambda labels, k=k, vals=vals: labels.get(k) not in vals)
        elif m.group("cmp"):
            k, op, v = m.group("ck"), m.group("cop"), m.group("cv")
            if op == "!=":
                clauses.append(lambda labels, k=k, v=v: labels.get(k) != v)
            else:
                clauses.append(lambda labels, k=k, v=v: labels.get(k) == v)
        else:
            k = m.group("ek")
            clauses.append(lambda labels, k=k: k in labels)

    def pred(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(c(labels) for c in clauses)

    return pred


def match_label_selector_object(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """Evaluate a metav1.LabelSelector (matchLabels/matchExpressions) against labels."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        k, op, vals = expr.get("key"), expr.get("operator"), set(expr.get("values") or [])
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and k in labels and labels[k] in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def _field_value(obj: dict[str, Any], path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def parse_field_selector(text: str | None) -> Predicate:
    """Compile a field selector; unknown paths compare as empty strings."""
    if not text or not text.strip():
        return lambda obj: True
    clauses: list[tuple[str, bool, str]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(==|!=|=)\s*(.*)", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        clauses.append((m.group(1), m.group(2) == "!=", m.group(3)))

    def pred(obj: dict[str, Any]) -> bool:
        for path, negate, value in clauses:
            equal = _field_value(obj, path) == value
            if equal == negate:
                return False
        return True

    return pred
