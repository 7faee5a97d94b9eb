"""pods/exec on the sandbox API server with the real kubectl (WebSocket v5) and the official
Python client (v4/v5): exit codes, stdin and its end, a pty with resize, -c, the usual errors, and
a client that vanishes mid-command (its processes are killed, no fd or process is left over)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apiserver.conftest import Cluster
from tests.apiserver.podbox import PodBox, children, fd_count, make_pod_box, settle
from tests.support.kubectl import kubectl_path


@pytest.fixture(scope="module")
def box(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, test_cgroup: Path) -> Iterator[PodBox]:
    yield from make_pod_box(cluster, tmp_path_factory.mktemp("box"), test_cgroup)


def test_exit_code_is_kubectls_exit_code(box: PodBox) -> None:
    r = box.kubectl("exec", "box", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 3
    assert r.stdout == "out\n" and "err\n" in r.stderr
    assert "command terminated with exit code 3" in r.stderr
    assert box.kubectl("exec", "box", "-c", "main", "--", "true").returncode == 0
    r = box.kubectl("exec", "box", "--", "no-such-program")
    assert r.returncode == 127 and "no-such-program" in r.stderr


def test_stdin_is_piped_and_its_end_reaches_the_command(box: PodBox) -> None:
    r = box.kubectl("exec", "-i", "box", "--", "cat", stdin="hi\n")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    big = "".join(f"line {i}\n" for i in range(20000))
    r = box.kubectl("exec", "-i", "box", "--", "sha256sum", stdin=big)
    import hashlib

    assert r.stdout.split()[0] == hashlib.sha256(big.encode()).hexdigest()


def test_tty_under_a_terminal_gets_a_pty_of_the_terminals_size(box: PodBox) -> None:
    cmd = (f"stty rows 31 cols 101; {kubectl_path()} -n {box.namespace} exec -it box -- "
           "sh -c 'tty; stty size; test -t 0 && echo interactive; exit 5'")
    r = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, env=box.env,
                       stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "/dev/pts/" in r.stdout and "31 101" in r.stdout and "interactive" in r.stdout


def test_it_without_a_terminal_carries_on_without_a_tty(box: PodBox) -> None:
    r = box.kubectl("exec", "-it", "box", "--", "sh", "-c", "test -t 1 || echo no-tty")
    assert r.returncode == 0 and r.stdout == "no-tty\n"
    assert "Unable to use a TTY" in r.stderr


def test_unknown_pod_or_container_and_not_running(box: PodBox, cluster: Cluster) -> None:
    r = box.kubectl("exec", "nope", "--", "true")
    assert r.returncode == 1 and 'Error from server (NotFound): pods "nope" not found' in r.stderr
    r = box.kubectl("exec", "box", "-c", "side", "--", "true")
    # kubectl 1.32 leaves the check to the server (BadRequest); 1.37 checks first, same words.
    assert r.returncode == 1 and "container side is not valid for pod box" in r.stderr, r.stderr
    code, status = _get_status(cluster, f"/api/v1/namespaces/{box.namespace}/pods/box/exec"
                                        "?command=true&container=side&stdout=true")
    assert (code, status["reason"], status["message"]) == (
        400, "BadRequest", "container side is not valid for pod box")
    from kubernetes import client

    client.CoreV1Api(cluster.api_client()).create_namespaced_pod(box.namespace, {
        "metadata": {"name": "pending"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})
    r = box.kubectl("exec", "pending", "--", "true")
    assert r.returncode == 1 and "pod pending does not have a host assigned" in r.stderr, r.stderr


def test_official_python_client(box: PodBox, cluster: Cluster) -> None:
    from kubernetes import client
    from kubernetes.stream import stream

    core = client.CoreV1Api(cluster.api_client())
    ws = stream(core.connect_get_namespaced_pod_exec, "box", box.namespace,
                command=["sh", "-c", "echo py; exit 9"], stderr=True, stdin=False, stdout=True, tty=False,
                _preload_content=False)
    ws.run_forever(timeout=30)
    assert ws.read_stdout() == "py\n"
    assert ws.returncode == 9


def _get_status(cluster: Cluster, path: str) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{cluster.server.url}{path}", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _raw_exec(cluster: Cluster, namespace: str, command: list[str]) -> socket.socket:
    """Open an exec WebSocket by hand and return its socket (to vanish without a goodbye)."""
    import base64
    import os
    from urllib.parse import urlencode

    port = cluster.server.port
    query = urlencode([("command", c) for c in command] + [("stdout", "true"), ("stdin", "true")])
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall((f"GET /api/v1/namespaces/{namespace}/pods/box/exec?{query} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Protocol: v5.channel.k8s.io\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def test_client_that_vanishes_leaves_no_process_or_fd(box: PodBox, cluster: Cluster) -> None:
    time.sleep(0.5)
    kids, fds = children(), fd_count()
    marker = f"sleep 300.{os.getpid()}"  # ours alone, on a shared machine
    socks = [_raw_exec(cluster, box.namespace, ["sh", "-c", f"{marker} & {marker}"]) for _ in range(5)]
    assert settle(lambda: len(children() - kids) >= 5), "the commands did not start"
    for s in socks:
        s.close()  # gone, without a close frame
    assert settle(lambda: children() <= kids), f"left over: {children() - kids}"
    assert settle(lambda: fd_count() <= fds), f"fds {fds} -> {fd_count()}"
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert out == [], f"processes of the vanished sessions survive: {out}"


def _masked_frame(payload: bytes) -> bytes:
    import os
    import struct

    mask = os.urandom(4)
    n = len(payload)
    if n >= 1 << 16:
        head = struct.pack(">BBQ", 0x82, 0x80 | 127, n)
    else:
        head = struct.pack(">BBH", 0x82, 0x80 | 126, n)
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    return head + mask + body


def test_client_that_floods_stdin_of_a_command_not_reading_then_vanishes(box: PodBox,
                                                                         cluster: Cluster) -> None:
    """The command never reads, the client keeps sending, then dies (its socket reset): the
    server, which stopped reading the socket meanwhile, still notices and kills the command."""
    import struct

    time.sleep(0.5)
    kids, fds = children(), fd_count()
    s = _raw_exec(cluster, box.namespace, ["sleep", "301"])
    assert settle(lambda: len(children() - kids) >= 1)
    chunk = _masked_frame(b"\x00" + b"x" * 65536)
    s.setblocking(False)
    sent, deadline = 0, time.monotonic() + 30
    while time.monotonic() < deadline:  # until the pipe, the queue and both socket buffers are full
        try:
            sent += s.send(chunk[sent % len(chunk):])
        except BlockingIOError:
            if sent > (6 << 20):
                break
            time.sleep(0.2)
            continue
    assert sent > (6 << 20), sent
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    s.close()
    assert settle(lambda: children() <= kids), f"left over: {children() - kids}"
    assert settle(lambda: fd_count() <= fds), f"fds {fds} -> {fd_count()}"
