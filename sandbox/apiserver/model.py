"""Request/response types shared by the REST modules (transport-independent)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .kinds import ResourceType


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    user: str = "system:anonymous"


@dataclass
class Response:
    code: int
    body: Any = None
    content_type: str = "application/json"
    stream: Iterator[bytes] | None = None


@dataclass
class Target:
    rt: ResourceType
    version: str
    namespace: str | None
    name: str | None
    sub: str | None


def json_response(code: int, body: Any) -> Response:
    return Response(code, body)


def truthy(v: str | None) -> bool:
    """Query-parameter booleans as the API server reads them."""
    return (v or "").lower() in ("1", "true", "yes")
