"""A thin JSON-over-REST layer on the official kubernetes client's ApiClient.

The kubelet works on plain dicts (the objects exactly as the API serves them) rather than the
client's generated models, so fields the models do not know survive and nothing is re-serialized.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Api:
    """JSON REST calls with the connection settings of a kubeconfig (parsed by the official client)."""

    def __init__(self, kubeconfig: str) -> None:
        import urllib3
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.host = cfg.host.rstrip("/")
        self.headers: dict[str, str] = {"Accept": "application/json"}
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if auth:
            prefix = (cfg.api_key_prefix or {}).get("authorization")
            self.headers["Authorization"] = (
                f"{prefix} {auth}" if prefix and not auth.startswith(prefix) else auth
            )
        tls: dict[str, Any] = {}
        if self.host.startswith("https"):
            tls = {
                "cert_reqs": "CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
                "ca_certs": cfg.ssl_ca_cert,
                "cert_file": cfg.cert_file,
                "key_file": cfg.key_file,
            }
        self.pool = urllib3.PoolManager(maxsize=8, **tls)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict | None = None,
        content_type: str = "application/json",
        timeout: float | None = 30,
    ) -> Any:
        import urllib3

        headers = dict(self.headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        url = self.host + path + ("?" + urlencode(query) if query else "")
        try:
            resp = self.pool.request(method, url, body=data, headers=headers, timeout=timeout, retries=False)
        except urllib3.exceptions.HTTPError as e:
            raise ApiError(0, f"cannot reach the API server at {self.host}: {e}") from None
        if resp.status >= 400:
            try:
                message = json.loads(resp.data or b"{}").get("message") or resp.reason
            except ValueError:
                message = resp.reason
            raise ApiError(resp.status, str(message))
        return json.loads(resp.data) if resp.data else None

    def get(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, path: str, **query: str) -> list[dict]:
        return (self.request("GET", path, query=query or None) or {}).get("items") or []

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def delete(self, path: str) -> None:
        try:
            self.request("DELETE", path, {"gracePeriodSeconds": 0, "propagationPolicy": "Background"})
        except ApiError as e:
            if e.status != 404:
                raise

    def watch(self, path: str, on_event: Callable[[], None], stop: threading.Event) -> None:
        """Call on_event for each watch event of `path` until stop is set (reconnects on error)."""
        while not stop.is_set():
            try:
                listing = self.request("GET", path) or {}
                rv = (listing.get("metadata") or {}).get("resourceVersion", "")
                for _ in self._stream(path, rv):
                    on_event()
                    if stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - any failure: back off, the resync covers the gap
                stop.wait(1.0)

    def _stream(self, path: str, rv: str) -> Iterator[bytes]:
        import urllib3

        query = urlencode({"watch": "true", "resourceVersion": rv, "timeoutSeconds": "60"})
        resp = self.pool.request(
            "GET",
            f"{self.host}{path}?{query}",
            headers=self.headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=5, read=90),
            retries=False,
        )
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, "watch failed")
            buf = b""
            for chunk in resp.stream(4096):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield line
        finally:
            resp.release_conn()
