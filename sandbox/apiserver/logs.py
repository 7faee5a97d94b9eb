"""The pods/log subresource: the container log file a kubelet recorded for the pod.

Where the file is: ``Api.log_resolver(namespace, pod, container)`` if set (an in-process
kubelet's hook), else the pod annotation ``sandbox.kmesh.io/log-path.<container>`` or
``sandbox.kmesh.io/log-path``; no file means an empty log. ``follow`` streams appended bytes
until the pod is deleted or the client goes away. A mixin of ``rest.Api``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import errors
from .model import Request, Response, Target, truthy
from .objects import LOG_PATH_ANNOTATION
from .store import Store

LogResolver = Callable[[str, str, str], "str | Path | None"]


class LogEndpoints:
    """GET pods/NAME/log with container, tailLines, limitBytes and follow."""

    # Provided by rest.Api.
    store: Store
    log_resolver: LogResolver | None
    stopping: bool
    _require: Callable[[Target], dict[str, Any]]

    def _log(self, req: Request, t: Target) -> Response:
        pod = self._require(t)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        containers += [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
        container = req.query.get("container") or ""
        if container and container not in containers:
            raise errors.bad_request(f"container {container} is not valid for pod {t.name}")
        if not container:
            if len(containers) > 1:
                raise errors.bad_request(
                    f"a container name must be specified for pod {t.name}, choose one of: "
                    f"[{' '.join(str(c) for c in containers)}]"
                )
            container = containers[0] if containers else ""
        path: str | Path | None = None
        if self.log_resolver is not None:
            path = self.log_resolver(t.namespace or "", t.name or "", container)
        if path is None:
            ann = pod["metadata"].get("annotations") or {}
            path = ann.get(f"{LOG_PATH_ANNOTATION}.{container}") or ann.get(LOG_PATH_ANNOTATION)
        data = b""
        if path:
            try:
                data = Path(path).read_bytes()
            except OSError:
                data = b""
        tail = req.query.get("tailLines")
        if tail is not None and tail.lstrip("-").isdigit():
            n = int(tail)
            lines = data.splitlines(keepends=True)
            data = b"".join(lines[-n:]) if n > 0 else b""
        limit = req.query.get("limitBytes")
        if limit and limit.isdigit():
            data = data[: int(limit)]
        if truthy(req.query.get("follow")) and path:
            return Response(200, None, "text/plain", self._follow(t, Path(path), data))
        return Response(200, data, "text/plain")

    def _follow(self, t: Target, path: Path, first: bytes) -> Iterator[bytes]:
        """Stream the log file as it grows until the pod is deleted or the client goes away."""
        yield first
        try:
            offset = path.stat().st_size
        except OSError:
            offset = len(first)
        while not self.stopping and self.store.get(t.rt, t.namespace or "", t.name or "") is not None:
            try:
                size = path.stat().st_size
                if size > offset:
                    with path.open("rb") as f:
                        f.seek(offset)
                        chunk = f.read(size - offset)
                    offset = size
                    yield chunk
                    continue
            except OSError:
                pass
            time.sleep(0.2)
            yield b""
