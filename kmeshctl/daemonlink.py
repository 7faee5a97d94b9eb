"""How kmeshctl reaches the daemons' admin API (loopback port 15200 on each node).

Two ways, tried in this order:

1. ``--admin-addr HOST:PORT``: straight HTTP (on the node itself, or through your own tunnel).
2. A Kubernetes port-forward (``kubernetes.stream.portforward``, the same API ``kubectl
   port-forward`` uses) to port 15200 of each ``app=kmesh`` pod in ``kmesh-system``;
   ``--node`` picks the daemon of one node. The cluster is ``--kubeconfig``/``--context``, else
   ``$KUBECONFIG``; with none of those, a running sandbox (``$KMESH_SANDBOX_DIR``, default
   ``~/.kmesh/sandbox``, whose API server serves pods/portforward like a cluster's), else
   ``~/.kube/config``.

Each HTTP request gets its own connection (one port-forward stream per request), so a
daemon restart between two requests is harmless. http.client is imported where a request is
made: every command module imports this one, and `kmeshctl --help` should not pay for it.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kmeshctl.common import KmeshctlError, UsageError

if TYPE_CHECKING:
    import http.client

ADMIN_PORT = 15200
DAEMON_NAMESPACE = "kmesh-system"
DAEMON_SELECTOR = "app=kmesh"

AdminAddrOpt = Annotated[
    str | None,
    typer.Option("--admin-addr", help="Reach the daemon's admin API at HOST:PORT directly "
                 "(default: a port-forward through the Kubernetes API, the sandbox's too).",
                 show_default=False, envvar="KMESH_ADMIN_ADDR"),
]
NodeOpt = Annotated[
    str | None,
    typer.Option("--node", help="Only the daemon on this node.", show_default=False),
]


def sandbox_dir() -> Path:
    return Path(os.environ.get("KMESH_SANDBOX_DIR") or "~/.kmesh/sandbox").expanduser()


@dataclass
class Daemon:
    """One daemon's admin API: direct (host, port) or a pod to port-forward to."""

    label: str  # how to name it in output: pod name, or host:port
    node: str = ""
    host: str = ""
    port: int = ADMIN_PORT
    pod: tuple[str, str] | None = None  # (namespace, name) for port-forward
    api: Any = None  # kubernetes ApiClient (port-forward)
    ready: bool | None = None  # the pod's Ready condition, when known from the API
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        if self.pod is not None:
            return f"pod {self.pod[0]}/{self.pod[1]} (port-forward to {self.port})"
        return f"{self.host}:{self.port}"

    # ----- transport ---------------------------------------------------------------------
    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        import http.client
        conn = http.client.HTTPConnection(self.host or "127.0.0.1", self.port, timeout=timeout)
        if self.pod is not None:
            from kubernetes import client
            from kubernetes.stream import portforward

            core = client.CoreV1Api(self.api)
            try:
                pf = portforward(core.connect_get_namespaced_pod_portforward, self.pod[1], self.pod[0],
                                 ports=str(self.port))
            except Exception as exc:  # noqa: BLE001 - one line for any client/websocket error
                raise KmeshctlError(f"cannot port-forward to {self.where}: {_short(exc)}") from None
            sock = pf.socket(self.port)
            sock.settimeout(timeout)
            conn.sock = sock
            self.extra["portforward"] = pf
        return conn

    def request(self, method: str, path: str, body: Any = None, timeout: float = 15.0
                ) -> tuple[int, bytes]:
        """(status, body); KmeshctlError when the daemon cannot be reached."""
        import http.client
        conn = self._connection(timeout)
        try:
            headers = {"Connection": "close"}
            if self.pod is not None:
                headers["Accept-Encoding"] = "gzip"  # big dumps through the API server's tunnel
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            if resp.getheader("Content-Encoding") == "gzip":
                import gzip

                payload = gzip.decompress(payload)
            return resp.status, payload
        except (OSError, http.client.HTTPException) as exc:
            raise KmeshctlError(f"cannot reach the kmesh daemon at {self.where}: {_short(exc)}; "
                                "is it running? (kmeshctl status)") from None
        finally:
            conn.close()
            pf = self.extra.pop("portforward", None)
            if pf is not None:
                pf.close()

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        status, data = self.request("GET", path, timeout=timeout)
        return _decode(self, path, status, data)

    def post_json(self, path: str, body: Any) -> Any:
        status, data = self.request("POST", path, body=body)
        return _decode(self, path, status, data)

    def stream_lines(self, path: str, idle_timeout: float = 10.0) -> Iterator[str]:
        """Lines of a chunked response (the trace stream); blank keep-alive lines skipped."""
        import http.client
        conn = self._connection(idle_timeout)
        try:
            conn.request("GET", path, headers={"Accept": "application/x-ndjson"})
            resp = conn.getresponse()
            if resp.status != 200:
                _decode(self, path, resp.status, resp.read())
            while True:
                line = resp.readline()
                if not line:
                    return
                text = line.decode().strip()
                if text:
                    yield text
        except (OSError, http.client.HTTPException) as exc:
            raise KmeshctlError(f"trace stream from {self.where} ended: {_short(exc)}") from None
        finally:
            conn.close()
            pf = self.extra.pop("portforward", None)
            if pf is not None:
                pf.close()


def _short(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def _decode(daemon: Daemon, path: str, status: int, data: bytes) -> Any:
    if status >= 400:
        try:
            message = json.loads(data).get("error") or data.decode().strip()
        except (ValueError, AttributeError):
            message = data.decode(errors="replace").strip()
        raise KmeshctlError(f"daemon {daemon.label}: {path}: HTTP {status}: {message}")
    try:
        return json.loads(data)
    except ValueError:
        raise KmeshctlError(f"daemon {daemon.label}: {path}: not JSON: {data[:80]!r}") from None


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--admin-addr {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:15200")
    return host.strip("[]") or "127.0.0.1", int(port)


def _probe(host: str, port: int, timeout: float = 1.0) -> dict[str, Any] | None:
    import http.client
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("GET", "/version", headers={"Connection": "close"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return json.loads(data) if resp.status == 200 else None
    except (OSError, ValueError, http.client.HTTPException):
        return None


def _sandbox_kubeconfig(kubeconfig: str | None, context: str | None) -> str | None:
    """The sandbox's kubeconfig when nothing names another cluster and its API server is up."""
    sandbox_kc = sandbox_dir() / "kubeconfig"
    if kubeconfig is not None or context is not None or os.environ.get("KUBECONFIG"):
        kc = kubeconfig or os.environ.get("KUBECONFIG") or ""
        if context is not None or not sandbox_kc.exists() or not Path(kc).expanduser().exists():
            return None
        return str(sandbox_kc) if Path(kc).expanduser().resolve() == sandbox_kc.resolve() else None
    if not sandbox_kc.exists():
        return None
    return str(sandbox_kc) if _api_answers(sandbox_kc) else None


def _api_answers(kubeconfig: Path) -> bool:
    """Whether the kubeconfig's server accepts a TCP connection (a sandbox that is down does not)."""
    from urllib.parse import urlsplit

    import yaml

    try:
        cfg = yaml.safe_load(kubeconfig.read_text()) or {}
        url = urlsplit(cfg["clusters"][0]["cluster"]["server"])
        with socket.create_connection((url.hostname or "127.0.0.1", url.port or 443), timeout=1.0):
            return True
    except (OSError, ValueError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return False


def _pod_ready(pod: dict[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _node(pod: dict[str, Any]) -> str:
    return (pod.get("spec") or {}).get("nodeName") or ""


def _name(pod: dict[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "")


def list_daemon_pods(api: Any) -> list[dict[str, Any]]:
    """The daemon pods as plain JSON (building the client's model objects costs ~1 s at first use)."""
    from kubernetes import client

    resp = client.CoreV1Api(api).list_namespaced_pod(DAEMON_NAMESPACE, label_selector=DAEMON_SELECTOR,
                                                     _preload_content=False)
    pods = json.loads(resp.data).get("items") or []
    return sorted(pods, key=lambda p: (_node(p), _name(p)))


def find_daemons(admin_addr: str | None = None, node: str | None = None, kubeconfig: str | None = None,
                 context: str | None = None, pod_name: str | None = None) -> list[Daemon]:
    """The daemons to talk to, in a stable order; KmeshctlError when there is none."""
    if admin_addr:
        host, port = parse_addr(admin_addr)
        info = _probe(host, port) or {}
        return [Daemon(label=info.get("pod") or f"{host}:{port}", node=info.get("node", ""), host=host,
                       port=port)]
    port = ADMIN_PORT
    sandbox_kc = _sandbox_kubeconfig(kubeconfig, context)
    if sandbox_kc is not None:
        kubeconfig = sandbox_kc
        port = int(os.environ.get("KMESH_SANDBOX_ADMIN_PORT") or ADMIN_PORT)  # tests beside a sandbox
    from kmeshctl.common import load_kube

    try:
        api = load_kube(kubeconfig, context)
    except KmeshctlError as exc:
        raise type(exc)(f"{exc} (or reach a daemon directly with --admin-addr HOST:PORT, "
                            "or start one with `kmeshctl sandbox up`)") from None
    pods = list_daemon_pods(api)
    if not pods:
        raise KmeshctlError(f"no kmesh daemon pods ({DAEMON_SELECTOR}) in namespace {DAEMON_NAMESPACE}; "
                            "install with `kmeshctl install`")
    if pod_name:
        pods = [p for p in pods if _name(p) == pod_name]
        if not pods:
            raise KmeshctlError(f"no kmesh daemon pod {pod_name!r} in {DAEMON_NAMESPACE}")
    if node:
        nodes = sorted({_node(p) for p in pods})
        pods = [p for p in pods if _node(p) == node]
        if not pods:
            raise KmeshctlError(f"no kmesh daemon on node {node!r}; daemons run on: {', '.join(nodes)}")
    return [Daemon(label=_name(p), node=_node(p), port=port, pod=(DAEMON_NAMESPACE, _name(p)), api=api,
                   ready=_pod_ready(p)) for p in pods]


def fill_pod_readiness(daemons: list[Daemon], kubeconfig: str | None, context: str | None) -> None:
    """For daemons reached directly (sandbox, --admin-addr), look up their pod's Ready condition
    through the API when one is configured; best effort, silent when there is no API."""
    direct = [d for d in daemons if d.ready is None]
    if not direct:
        return
    sandbox_kc = sandbox_dir() / "kubeconfig"
    kc = kubeconfig or (str(sandbox_kc) if sandbox_kc.exists() and context is None else None)
    if kc is None and not os.environ.get("KUBECONFIG"):
        return
    try:
        from kmeshctl.common import load_kube

        pods = {_name(p): p for p in list_daemon_pods(load_kube(kc, context))}
    except Exception:  # noqa: BLE001 - readiness is extra information here
        return
    for d in direct:
        pod = pods.get(d.label)
        if pod is not None:
            d.ready = _pod_ready(pod)
            d.node = d.node or _node(pod)


def find_one(admin_addr: str | None, node: str | None, kubeconfig: str | None, context: str | None,
             need_node: bool = False) -> Daemon:
    """A single daemon: the one asked for, or the first ready one when the data is cluster-wide.

    ``need_node``: the answer differs per node (BPF maps), so several daemons without
    ``--node`` is a usage error naming the nodes.
    """
    daemons = find_daemons(admin_addr, node, kubeconfig, context)
    if len(daemons) > 1 and need_node:
        nodes = ", ".join(d.node for d in daemons)
        raise UsageError(f"{len(daemons)} kmesh daemons run; pick one with --node ({nodes})")
    ready = [d for d in daemons if d.ready is not False]
    return (ready or daemons)[0]
