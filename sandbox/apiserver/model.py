"""Request/response types shared by the REST modules (transport-independent)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .kinds import ResourceType


@dataclass
class Request:
    """One HTTP request as the REST layer sees it (query: last value of each parameter)."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    user: str = "system:anonymous"
    raw_query: str = ""  # for repeated parameters (exec's command=...&command=...)


@dataclass
class Response:
    """A body (dict -> JSON, str/bytes as is) or, for watches and ``logs -f``, a chunk stream."""

    code: int
    body: Any = None
    content_type: str = "application/json"
    stream: Iterator[bytes] | None = None
    # exec/portforward: called with the HTTP handler to take over the connection (101 Switching).
    upgrade: Callable[[Any], None] | None = None


@dataclass
class Target:
    """What a resource URL names: kind, requested version, namespace, object name, subresource."""

    rt: ResourceType
    version: str
    namespace: str | None
    name: str | None
    sub: str | None


def json_response(code: int, body: Any) -> Response:
    """A JSON response (the transport serialises ``body``)."""
    return Response(code, body)


def truthy(v: str | None) -> bool:
    """Query-parameter booleans as the API server reads them."""
    return (v or "").lower() in ("1", "true", "yes")
