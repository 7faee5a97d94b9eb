"""The fortio stand-in honours fortio's own flags and echo parameters (as Kmesh's and Istio's
samples use them). Real HTTP on 127.0.0.1 to the real module started as the catalog starts it."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.images.fortio import (
    UsageError,
    canonical_header,
    parse_duration,
    parse_fortio_args,
    parse_listen,
)
from tests.support.procs import free_port, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fortio(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start ``python -m sandbox.images.fortio --sandbox-server fortio-v1 -- <fortio args>`` on a free
    loopback port (the port is put into the -http-port argument); returns the port."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> int:
        port = free_port()
        argv = [a.replace("PORT", str(port)) for a in args]
        log = (tmp_path / f"fortio-{port}.log").open("w")
        p = subprocess.Popen([sys.executable, "-m", "sandbox.images.fortio", "--sandbox-server", "fortio-v1",
                              "--", *argv], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        wait_for(lambda: "listening on" in (tmp_path / f"fortio-{port}.log").read_text(), 15, "fortio up")
        return port

    yield start
    for p in procs:
        stop_process(p)


def get(port: int, path: str = "/", method: str = "GET", body: bytes | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    t0 = time.monotonic()
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    elapsed = time.monotonic() - t0
    conn.close()
    return r.status, r.getheaders(), data, elapsed


def test_kmesh_sample_answers_server_1(fortio) -> None:
    port = fortio("server", "-http-port", "127.0.0.1:PORT", "-echo-server-default-params", "header=server:1")
    status, headers, body, _ = get(port, method="HEAD")
    assert status == 200
    assert [v for k, v in headers if k == "Server"] == ["1"]  # exactly as in the seed: `Server: 1`
    # A query replaces the default params entirely (fortio's rule): no `server:1` then.
    status, headers, _, _ = get(port, "/?header=x-version:v2")
    assert ("X-Version", "v2") in headers and ("Server", "1") not in headers
    assert dict(headers)["Server"] == "fortio-v1"  # the sandbox's own addition, only when nothing set one


def test_echo_parameters(fortio) -> None:
    port = fortio("server", "-http-port=127.0.0.1:PORT")
    assert get(port, "/?status=503")[0] == 503
    assert get(port, "/?status=429:100")[0] == 429
    assert get(port, "/?status=429:0")[0] == 200
    status, headers, body, _ = get(port, "/any/path?size=1000")
    assert status == 200 and len(body) == 1000 and dict(headers)["Content-Length"] == "1000"
    assert get(port, "/echo", "POST", b"hello fortio")[2] == b"hello fortio"
    assert get(port, "/")[2] == b""  # a GET echoes its (empty) body
    _, headers, _, _ = get(port, "/?header=A:1&header=B:2&close=true")
    assert ("A", "1") in headers and ("B", "2") in headers and dict(headers)["Connection"] == "close"
    assert get(port, "/?delay=300ms")[3] >= 0.3
    assert get(port, "/?delay=10s")[3] < 5  # capped by -max-echo-delay (1.5s by default)
    debug = get(port, "/debug")[2].decode()
    assert "GET /debug HTTP/1.1" in debug and "echo debug server" in debug


def test_default_params_with_status_delay_and_max_delay(fortio) -> None:
    port = fortio("server", "--http-port", "PORT", "-max-echo-delay", "200ms",
                  "-echo-server-default-params", "status=418&delay=5s&header=x-a:1")
    status, headers, _, elapsed = get(port)
    assert status == 418 and ("X-A", "1") in headers and 0.2 <= elapsed < 2


def test_only_fortio_server_runs() -> None:
    p = subprocess.run([sys.executable, "-m", "sandbox.images.fortio", "--", "load", "http://x/"], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and "only `fortio server`" in p.stderr


def test_flag_parsing_rules() -> None:
    assert parse_fortio_args([]) == {"command": "server"}
    got = parse_fortio_args(["server", "-http-port", "0.0.0.0:8080",
                             "-echo-server-default-params=header=server:2",
                             "-h2", "-config-dir", "/etc/fortio", "-unknown", "x"])
    assert got == {"command": "server", "http-port": "0.0.0.0:8080",
                   "echo-server-default-params": "header=server:2",
                   "h2": "true", "config-dir": "/etc/fortio", "unknown": "x"}
    with pytest.raises(UsageError):
        parse_fortio_args(["server", "-http-port"])
    assert parse_listen("8080") == ("0.0.0.0", 8080)
    assert parse_listen(":9090") == ("0.0.0.0", 9090)
    assert parse_listen("[::]:8080") == ("::", 8080)
    with pytest.raises(UsageError):
        parse_listen("/var/run/fortio.sock")
    assert parse_duration("1m30s") == 90 and parse_duration("250ms") == 0.25 and parse_duration("0") == 0
    assert canonical_header("server") == "Server" and canonical_header("x-VERSION") == "X-Version"
