"""Admin HTTP API on 127.0.0.1:15200: what the daemon knows, what the kernel holds, live traces.

Why loopback only: the API exposes every workload of the mesh and can change log levels, so
it is never bound to a routable address (the constructor refuses); kmeshctl reaches it by a
Kubernetes port-forward into the (host-network) daemon pod, or directly on the node.
Every response is JSON except ``/debug/ready`` (``OK``) and the trace stream (JSON lines,
chunked, one per connection event, blank lines as keep-alives).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from daemon import logging_setup
from daemon.config import is_loopback_host
from daemon.configdump import ConfigDumpCache, parse_sections
from daemon.version import version_info

log = logging.getLogger("daemon.admin")

PRESSURE_WARN = 0.9  # a map this full makes /status unhealthy: the next burst would be rejected


@dataclass
class AdminContext:
    """The components the API reads; any may be None while the daemon starts."""

    config: Any = None
    state: Any = None
    dataplane: Any = None
    xds: Any = None
    enroll: Any = None
    hub: Any = None
    resolver: Any = None
    sync: Any = None
    authz: Any = None
    started: float = 0.0

    def xds_status(self) -> dict[str, Any]:
        if self.xds is None:
            return {"connected": False, "ready": False, "last_error": "xDS client not started"}
        return self.xds.status()

    def pressure(self) -> dict[str, dict[str, Any]]:
        return self.dataplane.map_pressure() if self.dataplane is not None else {}

    def ready(self) -> tuple[bool, list[str]]:
        """(ready?, reasons not). Ready = xDS synced, enrollment converged, no map near full."""
        problems: list[str] = []
        xs = self.xds_status()
        if not xs.get("connected"):
            err = xs.get("last_error") or "not connected"
            problems.append(f"xDS {xs.get('address', '')} not connected: {err}")
        elif not xs.get("ready"):
            problems.append("xDS connected but initial resources not received yet")
        if self.dataplane is None:
            problems.append("data plane not loaded")
        elif self.sync is not None and getattr(self.sync, "last_error", ""):
            problems.append(f"writing the BPF maps failed: {self.sync.last_error}")
        else:
            for name, p in sorted(self.pressure().items()):
                if p.get("ratio", 0) >= PRESSURE_WARN:
                    problems.append(f"BPF map {name} is {p.get('ratio', 0):.0%} full "
                                    f"({p.get('entries')}/{p.get('max')})")
        if self.authz is not None and self.authz.last_error:
            problems.append(f"authorization tables not updated: {self.authz.last_error}")
        if self.enroll is not None:
            st = self.enroll.status()
            if not st.get("converged"):
                problems.append("pod enrollment not converged yet")
            for err in st.get("errors", {}).values():
                problems.append(f"enrollment: {err}")
        return not problems, problems

    def status(self) -> dict[str, Any]:
        cfg = self.config
        ready, problems = self.ready()
        xs = self.xds_status()
        enroll = self.enroll.status() if self.enroll is not None else {"pods": [], "namespaces": []}
        return {
            "version": version_info()["gitVersion"],
            "node": getattr(cfg, "node_name", ""),
            "pod": f"{getattr(cfg, 'pod_namespace', '')}/{getattr(cfg, 'pod_name', '')}",
            "uptime_s": round(time.time() - self.started, 1) if self.started else 0,
            "ready": ready,
            "problems": problems,
            "xds": {k: v for k, v in xs.items() if k != "history"},
            "xds_history": list(xs.get("history", []))[-20:],
            "enrollment": enroll,
            "dataplane_sync": self.sync.status() if self.sync is not None and hasattr(self.sync, "status")
            else {},
            "maps": self.pressure() if self.dataplane is not None else {},
            "monitoring": self.dataplane.monitoring() if hasattr(self.dataplane, "monitoring") else {},
            "events": {"total": getattr(self.hub, "events_total", 0),
                       "trace_subscribers": getattr(self.hub, "subscribers", 0)},
            "cgroup": str(getattr(cfg, "cgroup_root", "")),
            "pin_dir": str(getattr(cfg, "pin_dir", "")),
        }


class _Handler(BaseHTTPRequestHandler):
    server: AdminServer
    protocol_version = "HTTP/1.1"

    # ----- helpers -------------------------------------------------------------------------
    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, data: Any, code: int = 200) -> None:
        self._send(code, json.dumps(data, default=str).encode() + b"\n")

    def _error(self, code: int, message: str) -> None:
        self._json({"error": message}, code)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("request", extra={"path": self.path, "client": self.client_address[0]})

    # ----- routes --------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        ctx = self.server.ctx
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        try:
            if path == "/version":
                info = version_info()
                info.update({"node": getattr(ctx.config, "node_name", ""),
                             "pod": getattr(ctx.config, "pod_name", "")})
                self._json(info)
            elif path in ("/debug/config_dump", "/debug/config_dump/dual-engine"):
                self._config_dump(query)
            elif path in ("/debug/bpf", "/debug/config_dump/bpf/dual-engine"):
                self._bpf()
            elif path == "/debug/loggers":
                levels = logging_setup.get_levels()
                name = query.get("name")
                if name:
                    if name not in levels:
                        self._error(404, f"unknown logger {name!r}; loggers: {', '.join(levels)}")
                    else:
                        self._json({"name": name, "level": levels[name]})
                else:
                    self._json([{"name": n, "level": lvl} for n, lvl in levels.items()])
            elif path == "/debug/ready":
                ok, problems = ctx.ready()
                self._send(200 if ok else 503, b"OK\n" if ok else ("; ".join(problems) + "\n").encode(),
                           "text/plain")
            elif path == "/status":
                self._json(ctx.status())
            elif path == "/debug/memory":
                from daemon import memdebug

                self._json(memdebug.report(int(query.get("top", "25"))))
            elif path == "/debug/trace":
                self._trace(query)
            elif path == "/authz":
                self._authz(None)
            elif path in MONITORING_PATHS:
                self._monitoring(path, None)
            else:
                self._error(404, f"no such endpoint {path}; see /status, /debug/config_dump, /debug/bpf, "
                                 "/debug/trace, /debug/loggers, /debug/ready, /debug/memory, /monitoring, "
                                 "/version")
        except BrokenPipeError:
            pass
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            log.exception("admin request failed", extra={"path": path})
            try:
                self._error(500, f"{type(exc).__name__}: {exc}")
            except OSError:
                pass

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path.rstrip("/") == "/authz":
            self._authz({k: v[-1] for k, v in parse_qs(url.query).items()})
            return
        if url.path.rstrip("/") in MONITORING_PATHS:
            self._monitoring(url.path.rstrip("/"), parse_qs(url.query, keep_blank_values=True))
            return
        if url.path.rstrip("/") != "/debug/loggers":
            code = 404 if url.path not in self._known_get() else 405
            self._error(code, f"POST not supported on {url.path}")
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
            name, level = str(body["name"]), str(body["level"])
        except (ValueError, KeyError, TypeError):
            self._error(400, 'body must be JSON {"name": "<logger>", "level": "debug|info|warn|error"}')
            return
        try:
            logging_setup.set_level(name, level)
        except ValueError as exc:
            self._error(400, str(exc))
            return
        log.info("log level changed", extra={"logger": name, "level": level})
        self._json({"name": name, "level": logging_setup.get_levels()[name]})

    @staticmethod
    def _known_get() -> tuple[str, ...]:
        return ("/version", "/debug/config_dump", "/debug/bpf", "/debug/ready", "/status", "/debug/trace")

    def _monitoring(self, path: str, query: dict[str, list[str]] | None) -> None:
        """GET: the switch; POST: flip it (see parse_monitoring). Answers the state after."""
        ctx = self.server.ctx
        if ctx.dataplane is None:
            self._error(503, "data plane not loaded yet")
            return
        if query is not None:
            try:
                change = parse_monitoring(path, query)
            except ValueError as exc:
                self._error(400, str(exc))
                return
            ctx.dataplane.set_monitoring(**change)
            log.info("monitoring changed", extra={k: v for k, v in change.items() if v is not None})
        self._json({**ctx.dataplane.monitoring(), "node": getattr(ctx.config, "node_name", "")})

    def _authz(self, query: dict[str, str] | None) -> None:
        """GET: authorization state; POST ?enable=true|false (Kmesh's /authz)."""
        ctx = self.server.ctx
        if ctx.authz is None:
            self._error(503, "authorization not started yet")
            return
        if query is not None:
            value = (query.get("enable") or "").lower()
            if value not in ("true", "false"):
                self._error(400, "use POST /authz?enable=true or ?enable=false")
                return
            ctx.authz.set_enabled(value == "true")
        self._json({**ctx.authz.status(), "selected": ctx.authz.selected()})

    def _config_dump(self, query: dict[str, str]) -> None:
        ctx = self.server.ctx
        if ctx.state is None:
            self._error(503, "state not initialised yet")
            return
        try:
            sections = parse_sections(query.get("types"))
        except ValueError as exc:
            self._error(400, str(exc))
            return
        gz = "gzip" in (self.headers.get("Accept-Encoding") or "")
        body = self.server.dump_cache().get(sections, compress=gz)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _bpf(self) -> None:
        ctx = self.server.ctx
        if ctx.dataplane is None:
            self._error(503, "data plane not loaded yet")
            return
        enrolled = [p.as_dict() for p in ctx.enroll.enrolled()] if ctx.enroll is not None else []
        self._json({"maps": ctx.dataplane.read_back(), "raw": ctx.dataplane.raw_maps(),
                    "pressure": ctx.dataplane.map_pressure(), "enrolled": enrolled,
                    "authz": ctx.authz.dump() if ctx.authz is not None else None,
                    "pin_dir": str(getattr(ctx.config, "pin_dir", ""))})

    def _trace(self, query: dict[str, str]) -> None:
        ctx = self.server.ctx
        if ctx.hub is None or ctx.resolver is None:
            self._error(503, "event stream not started yet")
            return
        match = _match_all
        pod_ref = query.get("pod", "")
        if pod_ref:
            ns, sep, name = pod_ref.partition("/")
            if not sep or not ns or not name:
                self._error(400, f"pod={pod_ref!r}: expected NAMESPACE/NAME")
                return
            pod = ctx.enroll.find(ns, name) if ctx.enroll is not None else None
            if pod is None:
                self._error(404, f"pod {ns}/{name} is not enrolled on node "
                                 f"{getattr(ctx.config, 'node_name', '?')}")
                return
            cookie = pod.netns_cookie
            match = _CookieMatch(cookie)
        try:
            timeout = float(query.get("timeout", "0") or 0)
            limit = int(query.get("count", "0") or 0)
        except ValueError:
            self._error(400, "count must be an integer and timeout a number of seconds")
            return
        sub = ctx.hub.subscribe(match)
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self._chunk(b"\n")  # headers and one keep-alive out at once: the client knows we are live
            deadline = time.monotonic() + timeout if timeout > 0 else None
            sent = 0
            last_write = time.monotonic()
            while not self.server.stopping.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                event = sub.get(timeout=0.25)
                now = time.monotonic()
                if event is None:
                    if now - last_write > 2.0:
                        self._chunk(b"\n")
                        last_write = now
                    continue
                self._chunk(json.dumps(ctx.resolver.enrich(event), default=str).encode() + b"\n")
                last_write = now
                sent += 1
                if limit and sent >= limit:
                    break
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            ctx.hub.unsubscribe(sub)
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


MONITORING_PATHS = ("/monitoring", "/accesslog", "/connection_metrics")
_MONITORING_HELP = ("use POST /monitoring?enable=true|false (both), or ?accesslog=true|false and/or "
                    "?connectionMetrics=true|false")


def parse_monitoring(path: str, query: dict[str, list[str]]) -> dict[str, bool | None]:
    """A POST's query -> set_monitoring() arguments; ValueError (nothing applied) when it is wrong.

    As Kmesh: ``/monitoring?enable=`` switches both, ``/accesslog?enable=`` and
    ``/connection_metrics?enable=`` one each; ``/monitoring`` also takes ``accesslog=`` and
    ``connectionMetrics=`` (or ``metrics=``) to set both sub-switches in one request."""
    names = {"/monitoring": ("access_log", "metrics"), "/accesslog": ("access_log",),
             "/connection_metrics": ("metrics",)}[path]
    keys = {"enable": names}
    if path == "/monitoring":
        keys.update({"accesslog": ("access_log",), "connectionMetrics": ("metrics",),
                     "metrics": ("metrics",)})
    out: dict[str, bool | None] = {"access_log": None, "metrics": None}
    if not query:
        raise ValueError(_MONITORING_HELP)
    for key, values in query.items():
        if key not in keys:
            raise ValueError(f"unknown parameter {key!r}; {_MONITORING_HELP}")
        value = values[-1].strip().lower()
        if value not in ("true", "false"):
            raise ValueError(f"{key}={values[-1]!r}: expected true or false")
        for name in keys[key]:
            if out[name] is not None and out[name] != (value == "true"):
                raise ValueError(f"{key}={value} contradicts another parameter; {_MONITORING_HELP}")
            out[name] = value == "true"
    return out


def _match_all(_event: Any) -> bool:
    return True


class _CookieMatch:
    """Events of one pod: its netns cookie (ConnEvent dataclass or dict)."""

    def __init__(self, cookie: int) -> None:
        self.cookie = cookie

    def __call__(self, event: Any) -> bool:
        if isinstance(event, dict):  # authz records name both ends
            cookies = event.get("netns_cookies") or ()
            return event.get("netns_cookie") == self.cookie or self.cookie in cookies
        return getattr(event, "netns_cookie", None) == self.cookie


class AdminServer(ThreadingHTTPServer):
    """The admin API. Refuses any non-loopback bind address."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, ctx: AdminContext) -> None:
        if not is_loopback_host(host):
            raise ValueError(f"admin API address {host!r} is not loopback; it must be 127.0.0.1 or ::1")
        self.ctx = ctx
        self.stopping = threading.Event()
        self._dump_cache: ConfigDumpCache | None = None
        self._dump_lock = threading.Lock()
        if ":" in host:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    def dump_cache(self) -> ConfigDumpCache:
        with self._dump_lock:
            if self._dump_cache is None or self._dump_cache._state is not self.ctx.state:
                self._dump_cache = ConfigDumpCache(self.ctx.state)
            return self._dump_cache

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="admin-http", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
