"""``metav1.Status`` failures shaped exactly like the real API server's.

kubectl prints ``Error from server (<reason>): <message>`` from these, and the official
client raises ``ApiException`` with ``status``/``reason`` taken from them, so the shape
(code, reason, details{name,group,kind,causes}) matters to callers.
"""

from __future__ import annotations

from typing import Any

from .kinds import ResourceType


class ApiError(Exception):
    """A request failure carrying the HTTP code and the Status body to send."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(rt: ResourceType | None, name: str | None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if rt is not None:
        if rt.group:
            d["group"] = rt.group
        d["kind"] = rt.plural
    d.update(extra)
    return d


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.group_kind} "{name}" not found', _details(rt, name))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{rt.group_kind} "{name}" already exists', _details(rt, name))


def conflict(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.group_kind} "{name}": {why}',
        _details(rt, name),
    )


def invalid(rt: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """causes: (field, reason type e.g. FieldValueRequired, text like 'Required value')."""
    kind_group = f"{rt.kind}.{rt.group}" if rt.group else rt.kind
    texts = [f"{f}: {t}" for f, _, t in causes]
    joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    # Unlike NotFound/AlreadyExists, Invalid names the Kind (not the resource) in details.kind.
    details: dict[str, Any] = {"name": name}
    if rt.group:
        details["group"] = rt.group
    details["kind"] = rt.kind
    details["causes"] = [{"reason": r, "message": t, "field": f} for f, r, t in causes]
    return ApiError(422, "Invalid", f'{kind_group} "{name}" is invalid: {joined}', details)


def forbidden(rt: ResourceType, name: str, why: str) -> ApiError:
    return ApiError(403, "Forbidden", f'{rt.group_kind} "{name}" is forbidden: {why}', _details(rt, name))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(
    message: str = "the server does not allow this method on the requested resource",
) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message, {})


def path_not_found() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def unsupported_media(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - "
        f"accepted media types include: application/json-patch+json, application/merge-patch+json, "
        f'application/apply-patch+yaml, application/strategic-merge-patch+json; got "{content_type}"',
    )
