"""kmesh-connload (benchmarks/connload.c): built on demand, times whole connections, bounded.

Runs against a loopback server in this process (no namespaces needed): checks the count bound,
that every connection really is a new one (the server counts accepts), the response check, and
that failures are counted and reported instead of timed.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from benchmarks import connload
from tests.support.loopserver import LoopbackServer

REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


def _answer(conn: socket.socket) -> None:
    """Read one chunk, answer, close (LoopbackServer closes): one connection per request."""
    conn.recv(4096)
    conn.sendall(REPLY)


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(_answer) as srv:
        yield srv


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(connload.binary()), *args], capture_output=True, text=True, timeout=60)


def test_counts_one_connection_per_request(server: LoopbackServer) -> None:
    proc = _run("-a", "127.0.0.1", "-p", str(server.port), "-c", "2", "-n", "40")
    assert proc.returncode == 0, proc.stderr
    res = connload.parse_line(proc.stdout)
    assert res.requests == 40 and res.errors == 0 and res.concurrency == 2
    assert server.accepted == 40
    assert 0 < res.min_ms <= res.p50_ms <= res.p99_ms <= res.max_ms
    assert res.rps > 0 and res.cycle_ms == pytest.approx(2 / res.rps * 1000)


def test_duration_bound(server: LoopbackServer) -> None:
    res = connload.parse_line(_run("-a", "127.0.0.1", "-p", str(server.port), "-d", "0.3").stdout)
    assert res.requests > 0 and 0.3 <= res.duration_s < 5


def test_wrong_response_is_an_error_not_a_sample(server: LoopbackServer) -> None:
    proc = _run("-a", "127.0.0.1", "-p", str(server.port), "-n", "5", "-e", "HTTP/1.1 503")
    res = connload.parse_line(proc.stdout)
    assert res.requests == 0 and res.errors == 5 and proc.returncode == 1


def test_refused_connections_are_counted() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = connload.parse_line(_run("-a", "127.0.0.1", "-p", str(port), "-n", "3").stdout)
    assert res.errors == 3 and res.requests == 0


def test_unbounded_or_bad_arguments_are_refused() -> None:
    for args in (("-a", "127.0.0.1", "-p", "80"), ("-a", "localhost", "-p", "80", "-n", "1"),
                 ("-a", "127.0.0.1", "-p", "80", "-n", "1", "-c", "0")):
        proc = _run(*args)
        assert proc.returncode == 2 and "kmesh-connload:" in proc.stderr
    with pytest.raises(ValueError, match="bounded"):
        connload.run_connload("127.0.0.1", 80, "unused", connload.BUILD_DIR)


def test_parse_line_without_marker() -> None:
    with pytest.raises(ValueError, match="no summary line"):
        connload.parse_line("kmesh-connload: -a ADDR and -p PORT are required\n")


def test_binary_is_cached_by_source_hash(tmp_path) -> None:  # noqa: ANN001
    first = connload.binary(tmp_path)
    assert first.name.startswith("kmesh-connload-") and connload.binary(tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def _lockstep(a_args: tuple[str, ...], b_args: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Two clients joined by two pipes, as run_connload_lockstep joins them (a starts)."""
    a_to_b, b_to_a = os.pipe(), os.pipe()
    procs = []
    for args, tin, tout in ((a_args, b_to_a[0], a_to_b[1]), (b_args, a_to_b[0], b_to_a[1])):
        procs.append(subprocess.Popen([str(connload.binary()), *args, "-i", str(tin), "-o", str(tout)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      pass_fds=(tin, tout)))
    os.write(b_to_a[1], b"k")
    for fd in (*a_to_b, *b_to_a):
        os.close(fd)
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_lockstep_alternates_request_by_request() -> None:
    order: list[str] = []

    def tagged(tag: str):
        def handle(conn: socket.socket) -> None:
            order.append(tag)
            _answer(conn)
        return handle

    with LoopbackServer(tagged("a")) as a, LoopbackServer(tagged("b")) as b:
        pa, pb = _lockstep(("-a", "127.0.0.1", "-p", str(a.port), "-n", "20"),
                           ("-a", "127.0.0.1", "-p", str(b.port), "-n", "20"))
    assert pa.returncode == 0 and pb.returncode == 0, (pa.stderr, pb.stderr)
    ra, rb = connload.parse_line(pa.stdout), connload.parse_line(pb.stdout)
    assert ra.requests == rb.requests == 20
    assert order == ["a", "b"] * 20  # strictly one after the other, a first


def test_lockstep_ends_when_the_peer_ends(server: LoopbackServer) -> None:
    """The peer's bound ends both: a client whose peer exited sees end of file, not a hang."""
    pa, pb = _lockstep(("-a", "127.0.0.1", "-p", str(server.port), "-n", "3"),
                       ("-a", "127.0.0.1", "-p", str(server.port), "-n", "1000", "-d", "30"))
    ra, rb = connload.parse_line(pa.stdout), connload.parse_line(pb.stdout)
    assert ra.requests == 3 and rb.requests == 3
    assert rb.duration_s < 10


def test_lockstep_needs_both_pipes_and_one_in_flight() -> None:
    for args in (("-i", "0"), ("-i", "0", "-o", "1", "-c", "2")):
        proc = _run("-a", "127.0.0.1", "-p", "80", "-n", "1", *args)
        assert proc.returncode == 2 and "lockstep" in proc.stderr
