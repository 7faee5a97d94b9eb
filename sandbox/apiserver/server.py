"""HTTP transport and the in-process handle ``ApiServer``.

HTTP/1.1 with keep-alive on 127.0.0.1 (a thread per connection); watch and ``logs -f``
responses use chunked transfer encoding. A request with ``Authorization: Bearer <token>`` must
carry the admin token or a ServiceAccount token this server issued for the API audience,
else 401. A request without credentials is served as ``system:anonymous`` (``anonymous=True``,
the default) because kubectl never sends credentials over plain HTTP: client-go's clientcmd
loads a kubeconfig user's token only for TLS transports. With ``anonymous=False`` only health,
version and the OIDC documents are public.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import unauthorized
from .objects import IpAllocator
from .persist import Persister, load
from .rest import Api, LogResolver, Request, Response
from .store import Store
from .tokens import TokenIssuer

log = logging.getLogger("sandbox.apiserver")

PUBLIC_PATHS = {
    "/version",
    "/healthz",
    "/livez",
    "/readyz",
    "/.well-known/openid-configuration",
    "/openid/v1/jwks",
}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sandbox-apiserver"
    # Headers and body leave in one segment anyway; without this, Nagle + delayed ACK add 40 ms.
    disable_nagle_algorithm = True
    api: Api  # set on the subclass made per server
    anonymous: bool = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        log.debug("%s " + format, self.address_string(), *args)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0] or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(
            self.command, url.path, dict(parse_qsl(url.query, keep_blank_values=True)), headers, body,
            raw_query=url.query,
        )
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        user = self.api.authenticate(token) if token else ("system:anonymous" if self.anonymous else None)
        if user is None and url.path.rstrip("/") not in PUBLIC_PATHS:
            err = unauthorized()
            self._send(Response(err.code, err.status()))
            return
        req.user = user or "system:anonymous"
        self._send(self.api.handle(req))

    def _send(self, resp: Response) -> None:
        if resp.upgrade is not None:
            # exec/portforward: the handler owns the connection until the session ends.
            self.close_connection = True
            resp.upgrade(self)
            return
        if resp.stream is not None:
            self._send_stream(resp)
            return
        if isinstance(resp.body, (bytes, bytearray)):
            data = bytes(resp.body)
        elif isinstance(resp.body, str):
            data = resp.body.encode()
        else:
            data = json.dumps(resp.body, separators=(",", ":")).encode()
        self.send_response(resp.code)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        if self.command != "HEAD":
            self._headers_buffer.append(b"\r\n" + data)  # one write: status, headers and body
            self.flush_headers()
        else:
            self.end_headers()

    def _send_stream(self, resp: Response) -> None:
        assert resp.stream is not None
        self.send_response(resp.code)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        stream = resp.stream
        try:
            for chunk in stream:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    # Heartbeat: probe the socket so a vanished client ends the stream.
                    if _peer_closed(self.connection):
                        return
                    continue
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    do_GET = _handle
    do_POST = _handle
    do_PUT = _handle
    do_PATCH = _handle
    do_DELETE = _handle
    do_HEAD = _handle


def _peer_closed(sock: Any) -> bool:
    import select
    import socket
    import ssl

    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        if isinstance(sock, ssl.SSLSocket):
            # No MSG_PEEK through TLS: a streaming client sends nothing but its close.
            sock.setblocking(False)
            try:
                return sock.recv(1) == b""
            except (ssl.SSLWantReadError, BlockingIOError):
                return False
            finally:
                sock.setblocking(True)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class _Server(ThreadingHTTPServer):
    """Tracks open connections so ``close_all`` can end keep-alive and streaming ones on stop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: set[Any] = set()
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-request is routine; anything else is logged with its traceback."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            log.debug("client %s went away: %s", client_address, exc)
            return
        log.exception("error while serving %s", client_address)

    def close_all(self) -> None:
        import socket

        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ApiServer:
    """An API server in this process: ``port = ApiServer(port=0).start()``; ``.stop()``.

    ``token`` is the static admin bearer token (random if not given); ``state_dir`` keeps the
    ServiceAccount signing key across restarts; ``log_resolver(namespace, pod, container)``
    may return the path of a container's log file for ``pods/log`` (checked before the
    ``sandbox.kmesh.io/log-path`` annotation); a deleted namespace stays Terminating for
    ``namespace_grace`` seconds before it and its contents go (0: at once); ``persist`` keeps
    the objects in ``state_dir/objects.json`` across restarts (off: every start is a new cluster);
    ``graceful_pod_deletion`` makes deleting a pod bound to a node only mark it (deletionTimestamp)
    until a kubelet deletes it with gracePeriodSeconds=0 (off: pods are removed at once); ``tls``
    serves HTTPS with a CA kept in ``state_dir`` (written into the kubeconfig) so that kubectl sends
    the token, and then ``anonymous=False`` makes every unauthenticated request a 401.
    """

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        token: str | None = None,
        state_dir: Path | None = None,
        service_cidr: str = "10.96.0.0/16",
        watch_history: int = 10000,
        log_resolver: LogResolver | None = None,
        anonymous: bool = True,
        namespace_grace: float = 1.0,
        persist: bool = False,
        graceful_pod_deletion: bool = False,
        tls: bool = False,
    ) -> None:
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the sandbox API server listens on loopback only")
        self.host = host
        self.requested_port = port
        self.token = token or secrets.token_urlsafe(24)
        self.state_dir = Path(state_dir) if state_dir else None
        self.store = Store(history=watch_history)
        self.issuer = TokenIssuer(self.state_dir)
        self.ips = IpAllocator(service_cidr)
        self.api = Api(self.store, self.issuer, self.ips, self.token, log_resolver)
        self.api.namespace_grace = namespace_grace
        self.api.graceful_pod_deletion = graceful_pod_deletion
        self._persister: Persister | None = None
        if persist:
            if self.state_dir is None:
                raise ValueError("persist=True needs a state_dir")
            restored = load(self.store, self.ips, self.state_dir, self.api.node_ports)
            log.info("restored %d objects from %s", restored, self.state_dir)
            self._persister = Persister(self.store, self.state_dir)
        self.api.bootstrap()
        self.tls = tls
        self.ca_pem: bytes | None = None
        self._ssl: Any = None
        if tls:
            from .tls import server_context

            self._ssl, self.ca_pem = server_context(self.state_dir)
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.anonymous = anonymous

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def set_log_resolver(self, resolver: LogResolver | None) -> None:
        self.api.log_resolver = resolver

    def start(self) -> int:
        """Bind and serve in a background thread; returns the bound port."""
        handler = type("Handler", (_Handler,), {"api": self.api, "anonymous": self.anonymous})
        self._httpd = _Server((self.host, self.requested_port), handler)
        if self._ssl is not None:
            # The handshake happens on the first read, in the connection's own thread.
            self._httpd.socket = self._ssl.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="apiserver", daemon=True)
        self._thread.start()
        if self._persister is not None:
            self._persister.start()
        return self.port

    def stop(self) -> None:
        self.api.stopping = True
        self.store.close_watchers()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.close_all()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._persister is not None:
            self._persister.stop()
            self._persister = None

    def write_kubeconfig(self, path: Path, context: str = "sandbox") -> Path:
        from .kubeconfig import write_kubeconfig

        return write_kubeconfig(Path(path), self.url, self.token, context, self.ca_pem)

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
