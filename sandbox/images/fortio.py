"""The sandbox's stand-in for ``fortio server``: fortio's HTTP echo server, with fortio's own flags.

The image catalog runs ``python -m sandbox.images.fortio [--sandbox-server NAME] -- <the
container's fortio arguments>``, so manifests written for the real image work unchanged:

- ``server`` (the image's default command; other fortio commands are refused with exit 1);
- ``-http-port [host:]port`` (default 8080, as fortio) - ``-flag value``, ``-flag=value`` and
  ``--flag`` forms, as Go's flag package reads them;
- ``-echo-server-default-params "header=name:value&status=..."``: the query used when a request
  has none (Kmesh's sample answers ``Server: 1`` / ``Server: 2`` with ``header=server:1``);
- ``-max-echo-delay`` (default 1.5s) caps ``delay=``; ``-echo-debug-path`` (default ``/debug``);
  other fortio flags are accepted and ignored (logged).

Echo semantics (fortio's EchoHandler): any path echoes the request body back; query parameters
``status=`` (a code, or ``503:20,429:5`` = code:percent pairs, else 200), ``delay=`` (a duration
or duration:percent pairs), ``size=`` (a payload of that many bytes, or size:percent pairs),
``header=name:value`` (repeatable, adds a response header), ``close=true`` (close after replying).
``<debug path>`` prints the request back as text.

One sandbox addition: fortio sends no ``Server`` header of its own; here, when neither the query
nor the default params set one, the response carries ``Server: <--sandbox-server>`` (the kubelet
passes ``fortio-<version label>``) so a plain ``fortio server`` sample still shows which version
answered.
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlparse

MAX_PAYLOAD = 256 * 1024  # fortio's -maxpayloadsizekb default
# fortio flags that take a value (so "-flag value" consumes the next word); the rest are booleans.
_VALUE_FLAGS = {"http-port", "echo-server-default-params", "max-echo-delay", "echo-debug-path", "grpc-port",
                "redirect-port", "config-dir", "ui-path", "loglevel", "base-url", "static-dir", "data-dir",
                "cert", "key", "cacert", "maxpayloadsizekb", "tcp-port", "udp-port", "sync", "config",
                "server-idle-timeout"}
_BOOL_FLAGS = {"h2", "json", "logger-no-color", "logger-force-color", "no-reresolve", "quiet"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class UsageError(Exception):
    pass


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration for the forms fortio users write: 250ms, 1.5s, 1m30s, 0."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"invalid duration {text!r}")
    return total


def parse_fortio_args(argv: list[str]) -> dict[str, str]:
    """fortio's command line -> {"command": ..., flag: value}; raises UsageError."""
    out: dict[str, str] = {}
    positional: list[str] = []
    i = 0
    command = None
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("-") and tok not in ("-", "--"):
            name, eq, value = tok.lstrip("-").partition("=")
            if not eq:
                takes_value = name in _VALUE_FLAGS or (
                    name not in _BOOL_FLAGS and i + 1 < len(argv) and not argv[i + 1].startswith("-"))
                if takes_value:
                    if i + 1 >= len(argv):
                        raise UsageError(f"flag needs an argument: -{name}")
                    value = argv[i + 1]
                    i += 1
                else:
                    value = "true"
            out[name] = value
        elif command is None:
            command = tok
        else:
            positional.append(tok)
        i += 1
    out["command"] = command or "server"
    if positional:
        out["args"] = " ".join(positional)
    return out


def parse_listen(value: str) -> tuple[str, int]:
    """``8080``, ``:8080``, ``0.0.0.0:8080``, ``[::]:8080`` -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "", value
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"-http-port {value!r}: give [host:]port (unix sockets and 'disabled' are not "
                         "supported here)")
    return host or "0.0.0.0", int(port)


def canonical_header(name: str) -> str:
    """Go's http.CanonicalHeaderKey: ``server`` -> ``Server``, ``x-version`` -> ``X-Version``."""
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
        return name
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _weighted(spec: str, parse: type | object, rng: random.Random) -> object | None:
    """fortio's "value" or "value:percent,value:percent" (the rest of the time: None)."""
    choices = []
    for part in spec.split(","):
        value, _, pct = part.partition(":")
        if not pct:
            return parse(value)  # type: ignore[operator]
        choices.append((parse(value), float(pct)))  # type: ignore[operator]
    roll = rng.uniform(0, 100)
    acc = 0.0
    for value, pct in choices:
        acc += pct
        if roll < acc:
            return value
    return None


def make_handler(server_name: str | None, default_params: str, max_delay: float,
                 debug_path: str) -> type[BaseHTTPRequestHandler]:
    hostname = socket.gethostname()
    rng = random.Random()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            sys.stderr.write(f"{self.client_address[0]} {format % args}\n")

        def send_response(self, code: int, message: str | None = None) -> None:
            # Like Go's net/http: a status line and Date, no Server header of our own here.
            self.log_request(code)
            self.send_response_only(code, message)
            self.send_header("Date", self.date_time_string())

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _debug(self, body: bytes) -> None:
            lines = [f"Φορτίο (fortio stand-in) echo debug server on {hostname} - request from "
                     f"{self.client_address[0]}:{self.client_address[1]}", "",
                     f"{self.command} {self.path} {self.request_version}", "", "headers:", ""]
            lines += [f"{k}: {v}" for k, v in self.headers.items()]
            lines += ["", f"body:\n\n{body.decode(errors='replace')}", ""]
            self._reply(200, "\n".join(lines).encode(), [("Content-Type", "text/plain; charset=UTF-8")])

        def _reply(self, status: int, payload: bytes, headers: list[tuple[str, str]],
                   close: bool = False) -> None:
            self.send_response(status)
            names = {k.lower() for k, _ in headers}
            for k, v in headers:
                self.send_header(k, v)
            if "server" not in names and server_name:
                self.send_header("Server", server_name)
            self.send_header("Content-Length", str(len(payload)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _echo(self) -> None:
            body = self._body()
            url = urlparse(self.path)
            if debug_path and url.path.rstrip("/") == debug_path.rstrip("/"):
                self._debug(body)
                return
            query = url.query or default_params
            params = parse_qsl(query, keep_blank_values=True)
            headers: list[tuple[str, str]] = []
            status, delay, size, close = 200, 0.0, None, False
            for key, value in params:
                try:
                    if key == "header":
                        name, _, hv = value.partition(":")
                        if name.strip():
                            headers.append((canonical_header(name.strip()), hv.strip()))
                    elif key == "status":
                        picked = _weighted(value, int, rng)
                        status = int(picked) if picked is not None else 200
                    elif key == "delay":
                        picked = _weighted(value, parse_duration, rng)
                        delay = min(float(picked), max_delay) if picked is not None else 0.0
                    elif key == "size":
                        picked = _weighted(value, int, rng)
                        size = min(int(picked), MAX_PAYLOAD) if picked is not None else None
                    elif key == "close":
                        close = value.lower() in ("true", "1", "on", "yes", "")
                except ValueError:
                    sys.stderr.write(f"ignoring bad {key}={value!r}\n")
            if delay > 0:
                time.sleep(delay)
            if size is not None:
                payload = (b"abcdefghijklmnopqrstuvwxyz0123456789" * (size // 36 + 1))[:size]
                headers.append(("Content-Type", "application/octet-stream"))
            else:
                payload = body
                if self.headers.get("Content-Type"):
                    headers.append(("Content-Type", self.headers["Content-Type"]))
            self._reply(status, payload, headers, close)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _echo

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sandbox-server", default=None,
                   help="Server header when the echo params set none (sandbox addition)")
    p.add_argument("fortio_args", nargs=argparse.REMAINDER, help="fortio's own arguments, after --")
    a = p.parse_args(argv)
    fargs = [x for x in a.fortio_args if x != "--"] if a.fortio_args[:1] == ["--"] else a.fortio_args
    try:
        opts = parse_fortio_args(fargs)
        if opts["command"] != "server":
            raise UsageError(f"the sandbox's fortio runs only `fortio server`, not {opts['command']!r}")
        if "args" in opts:
            raise UsageError(f"fortio server takes no arguments, got {opts['args']!r}")
        host, port = parse_listen(opts.get("http-port", "8080"))
        max_delay = parse_duration(opts.get("max-echo-delay", "1.5s"))
    except (UsageError, ValueError) as e:
        sys.stderr.write(f"fortio: {e}\n")
        return 1
    known = {"command", "http-port", "echo-server-default-params", "max-echo-delay", "echo-debug-path"}
    for flag in sorted(set(opts) - known):
        sys.stderr.write(f"fortio stand-in: ignoring -{flag}\n")
    handler = make_handler(a.sandbox_server, opts.get("echo-server-default-params", ""), max_delay,
                           opts.get("echo-debug-path", "/debug"))
    server_cls = ThreadingHTTPServer
    if ":" in host:
        class V6Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6
        server_cls = V6Server
    server_cls.allow_reuse_address = True
    server_cls.daemon_threads = True
    httpd = server_cls((host, port), handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.stderr.write(f"Fortio stand-in http-echo server listening on {host}:{port}\n")
    sys.stderr.flush()
    try:
        httpd.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
