"""The daemon's Kubernetes API client: JSON over HTTPS with the standard library only.

Why not the official ``kubernetes`` package: importing it costs the daemon ~24 MiB of RSS (its
generated models, urllib3, yaml, dateutil, ...), a fifth of the node agent's memory budget, and
its watch turns every event into model objects the daemon never reads. The daemon needs five
calls: get, list, watch, a merge patch, and the connection settings from a kubeconfig or the
in-cluster service account. Objects come back as the plain dicts the API server sent.

Every request opens its own connection (the daemon makes a handful of requests outside its two
long watches), so a client is safe to share between threads without a lock.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

MERGE_PATCH = "application/merge-patch+json"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
REQUEST_TIMEOUT = 30.0


class KubeConfigError(ValueError):
    """The connection settings cannot be used; the message says what to fix."""


class ApiError(Exception):
    """A failed API call: ``status`` is the HTTP status (0: the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if message else f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class _Token:
    """A bearer token, static or read from a file that is re-read when it changes (projected
    service-account tokens are rotated in place by the kubelet)."""

    value: str = ""
    path: Path | None = None
    _stamp: tuple[int, int] | None = None

    def current(self) -> str:
        if self.path is None:
            return self.value
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self.value = self.path.read_text().strip()
                self._stamp = stamp
        except OSError:
            pass  # keep the last token read; the API answers 401 if it is no longer good
        return self.value


class KubeClient:
    """Requests against one API server; see :meth:`from_kubeconfig` and :meth:`in_cluster`."""

    def __init__(self, server: str, *, token: str = "", token_file: Path | None = None,
                 ssl_context: ssl.SSLContext | None = None, tls_server_name: str = "",
                 timeout: float = REQUEST_TIMEOUT) -> None:
        url = urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise KubeConfigError(f"API server address {server!r} is not an http(s) URL; "
                                  "set the cluster's server to https://HOST:PORT")
        self.server = server.rstrip("/")
        self._https = url.scheme == "https"
        self._host = url.hostname
        try:
            self._port = url.port or (443 if self._https else 80)
        except ValueError:
            raise KubeConfigError(f"API server address {server!r} has a bad port") from None
        self._prefix = url.path.rstrip("/")
        self._token = _Token(token, token_file)
        if self._https and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context
        self._server_name = tls_server_name or self._host
        self.timeout = timeout

    # ----- construction ------------------------------------------------------------------
    @classmethod
    def from_kubeconfig(cls, path: str | Path, context: str | None = None) -> KubeClient:
        """The current (or named) context of a kubeconfig; ``path`` may list several files
        separated by ``:`` as $KUBECONFIG does (the first definition of a name wins)."""
        merged, base = _load_kubeconfig(str(path))
        name = context or merged.get("current-context") or ""
        if not name:
            raise KubeConfigError(f"kubeconfig {path} has no current-context; set one "
                                  "(kubectl config use-context NAME)")
        ctx = _named(merged, "contexts", name, path).get("context") or {}
        cluster = _named(merged, "clusters", ctx.get("cluster", ""), path).get("cluster") or {}
        user_name = ctx.get("user", "")
        user = (_named(merged, "users", user_name, path).get("user") or {}) if user_name else {}
        server = cluster.get("server", "")
        if not server:
            raise KubeConfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server address")
        if user.get("exec") or user.get("auth-provider"):
            raise KubeConfigError(f"kubeconfig {path}: user {user_name!r} uses an exec/auth-provider plugin, "
                                  "which kmesh-daemon does not run; use a token or client certificate")
        if user.get("username") or user.get("password"):
            raise KubeConfigError(f"kubeconfig {path}: user {user_name!r} uses basic auth, which "
                                  "kmesh-daemon does not support; use a token or client certificate")
        ctx_ssl = None
        if server.startswith("https"):
            ctx_ssl = _ssl_context(
                ca_file=_file(cluster.get("certificate-authority"), base),
                ca_data=_b64(cluster.get("certificate-authority-data"), "certificate-authority-data", path),
                cert_file=_file(user.get("client-certificate"), base),
                cert_data=_b64(user.get("client-certificate-data"), "client-certificate-data", path),
                key_file=_file(user.get("client-key"), base),
                key_data=_b64(user.get("client-key-data"), "client-key-data", path),
                insecure=bool(cluster.get("insecure-skip-tls-verify")), where=f"kubeconfig {path}")
        token_file = _file(user.get("tokenFile"), base)
        return cls(server, token=str(user.get("token") or ""),
                   token_file=Path(token_file) if token_file and not user.get("token") else None,
                   ssl_context=ctx_ssl, tls_server_name=cluster.get("tls-server-name", ""))

    @classmethod
    def in_cluster(cls, sa_dir: Path = SERVICE_ACCOUNT_DIR,
                   environ: dict[str, str] | None = None) -> KubeClient:
        """The pod's service account: KUBERNETES_SERVICE_HOST/PORT, ``sa_dir``/token and ca.crt."""
        env = os.environ if environ is None else environ
        host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise KubeConfigError("no --kubeconfig given and not in a pod (KUBERNETES_SERVICE_HOST/PORT "
                                  "unset); pass --kubeconfig or set KUBECONFIG")
        token, ca = sa_dir / "token", sa_dir / "ca.crt"
        for f in (token, ca):
            if not f.is_file():
                raise KubeConfigError(f"in-cluster config: {f} is missing; mount the service account "
                                      "token (automountServiceAccountToken) or pass --kubeconfig")
        if ":" in host:
            host = f"[{host}]"
        ctx = _ssl_context(ca_file=str(ca), where="in-cluster config")
        return cls(f"https://{host}:{port}", token_file=token, ssl_context=ctx)

    # ----- requests ----------------------------------------------------------------------
    def _connect(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._https:
            return _HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl,
                                    server_name=self._server_name)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "kmesh-daemon"}
        token = self._token.current()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _send(self, method: str, path: str, query: dict[str, Any] | None, body: Any,
              content_type: str | None, timeout: float | None) -> tuple[http.client.HTTPConnection,
                                                                       http.client.HTTPResponse]:
        url = self._prefix + path + ("?" + urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        conn = self._connect(timeout)
        try:
            conn.request(method, url, body=data, headers=self._headers(content_type if data else None))
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ApiError(0, "Unreachable", f"cannot reach the API server at {self.server}: "
                           f"{exc or type(exc).__name__}") from None
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            raise _status_error(resp.status, resp.reason, raw)
        return conn, resp

    def request(self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json") -> Any:
        """One call; the decoded JSON answer (None when empty). Raises ApiError."""
        conn, resp = self._send(method, path, query, body, content_type, self.timeout)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, "Unreachable", f"reading the answer from {self.server}: {exc}") from None
        finally:
            conn.close()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def list(self, path: str, **query: Any) -> dict[str, Any]:
        """The whole list object (``items`` and ``metadata.resourceVersion``)."""
        return self.request("GET", path, query or None)

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    def watch(self, path: str, resource_version: str = "", timeout_seconds: int = 240,
              **query: Any) -> Watch:
        """A watch from ``resource_version``, ended by the server after ``timeout_seconds``."""
        q = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(int(timeout_seconds)),
             **query}
        if resource_version:
            q["resourceVersion"] = resource_version
        # The socket timeout only catches a dead server; the server ends the watch first.
        conn, resp = self._send("GET", path, q, None, None, timeout_seconds + 30)
        return Watch(conn, resp)


class Watch:
    """Iterates ``(type, object)`` of a watch stream; ``stop()`` from any thread ends it at once.

    An ERROR event (the server's Status, e.g. 410 Gone for an expired resourceVersion) is raised
    as ApiError with the Status code, so callers handle it like a failed request.
    """

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._resp = resp
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
            except OSError:
                pass

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            while not self._stopped.is_set():
                try:
                    line = self._resp.readline()
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    if self._stopped.is_set():
                        return
                    why = str(exc) or type(exc).__name__
                    raise ApiError(0, "Unreachable", f"watch stream broken: {why}") from None
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type", ""), event.get("object") or {}
                if kind == "ERROR":
                    raise ApiError(int(obj.get("code") or 500), str(obj.get("reason") or "Error"),
                                   str(obj.get("message") or ""))
                yield kind, obj
        finally:
            self._conn.close()


class _HTTPSConnection(http.client.HTTPSConnection):
    """HTTPS whose certificate check names ``server_name`` (kubeconfig tls-server-name)."""

    def __init__(self, host: str, port: int, *, timeout: float | None, context: ssl.SSLContext | None,
                 server_name: str) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


def _status_error(status: int, reason: str, raw: bytes) -> ApiError:
    try:
        doc = json.loads(raw or b"{}")
        return ApiError(status, str(doc.get("reason") or reason), str(doc.get("message") or ""))
    except (ValueError, AttributeError):
        return ApiError(status, reason, raw[:200].decode(errors="replace"))


def _load_kubeconfig(paths: str) -> tuple[dict[str, Any], Path]:
    """Merge the files of a $KUBECONFIG-style list: first current-context and first of each name win.
    Returns the merged config and the directory relative file paths are resolved against."""
    import yaml  # only with a kubeconfig; in-cluster daemons never load it

    merged: dict[str, Any] = {"clusters": [], "contexts": [], "users": []}
    base: Path | None = None
    files = [p for p in paths.split(os.pathsep) if p]
    for name in files:
        p = Path(name).expanduser()
        try:
            doc = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise KubeConfigError(f"cannot read kubeconfig {p}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" (line {where.line + 1})" if where is not None else ""
            raise KubeConfigError(f"kubeconfig {p} is not valid YAML{at}; fix or regenerate it") from None
        if not isinstance(doc, dict):
            raise KubeConfigError(f"kubeconfig {p} is not a kubeconfig (a YAML mapping with clusters, "
                                  "users, contexts)")
        if base is None:
            base = p.resolve().parent
        if not merged.get("current-context") and doc.get("current-context"):
            merged["current-context"] = doc["current-context"]
        for key in ("clusters", "contexts", "users"):
            have = {e.get("name") for e in merged[key]}
            for entry in doc.get(key) or []:
                if isinstance(entry, dict) and entry.get("name") not in have:
                    merged[key].append(entry)
    if base is None:
        raise KubeConfigError("empty kubeconfig path; pass --kubeconfig FILE")
    return merged, base


def _named(cfg: dict[str, Any], key: str, name: str, path: str | Path) -> dict[str, Any]:
    for entry in cfg.get(key) or []:
        if entry.get("name") == name:
            return entry
    raise KubeConfigError(f"kubeconfig {path}: no {key[:-1]} named {name!r}; check its contexts")


def _file(value: Any, base: Path) -> str | None:
    if not value:
        return None
    p = Path(str(value)).expanduser()
    return str(p if p.is_absolute() else base / p)


def _b64(value: Any, field: str, path: str | Path) -> bytes | None:
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise KubeConfigError(f"kubeconfig {path}: {field} is not base64") from None


def _ssl_context(*, ca_file: str | None = None, ca_data: bytes | None = None, cert_file: str | None = None,
                 cert_data: bytes | None = None, key_file: str | None = None, key_data: bytes | None = None,
                 insecure: bool = False, where: str) -> ssl.SSLContext:
    """Server verification by the given CA (else the system's), optional client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    try:
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif ca_file or ca_data:
            ctx.load_verify_locations(cafile=ca_file, cadata=ca_data.decode() if ca_data else None)
        if (cert_file or cert_data) and not (key_file or key_data):
            raise KubeConfigError(f"{where}: a client certificate without a client key; add client-key")
        if cert_file or cert_data:
            _load_cert_chain(ctx, cert_file, cert_data, key_file, key_data)
    except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise KubeConfigError(f"{where}: cannot load the CA or client certificate: {reason}") from None
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_file: str | None, cert_data: bytes | None,
                     key_file: str | None, key_data: bytes | None) -> None:
    """ssl loads certificates only from files: inline data goes through a 0600 file removed at once."""
    made: list[str] = []
    try:
        def as_file(data: bytes | None, file: str | None) -> str | None:
            if data is None:
                return file
            fd, name = tempfile.mkstemp(prefix="kmesh-kube-", suffix=".pem")
            made.append(name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return name

        cert = as_file(cert_data, cert_file)
        key = as_file(key_data, key_file)
        ctx.load_cert_chain(cert or "", key)
    finally:
        for name in made:
            os.unlink(name)


def pod_path(namespace: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods" + (f"/{name}" if name else "")
