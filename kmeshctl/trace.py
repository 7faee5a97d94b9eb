"""``kmeshctl trace pod NAME``: one pod's connections as the kernel translated them.

Why a stream from the daemon: the ring buffer is on the pod's node, so the CLI asks that
node's daemon (found from the pod's ``spec.nodeName``) for ``/debug/trace?pod=ns/name`` and
prints each JSON line as one hubble-like line: time, source pod, original destination
(VIP:port and service), the chosen backend (pod, ip:port) and the verdict; on close the
bytes, duration and RTT. Without ``-f`` it stops after ``--count`` events or ``--timeout``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from kmeshctl.common import ContextOpt, KmeshctlError, KubeconfigOpt, UsageError, warn
from kmeshctl.daemonlink import AdminAddrOpt, Daemon, NodeOpt, find_daemons

trace_app = typer.Typer(help="Trace a pod's connections through the data plane.", no_args_is_help=True)

_VERDICTS = {"translated": "TRANSLATED", "passthrough": "PASSTHROUGH",
             "no_healthy_endpoint": "NO_HEALTHY_ENDPOINT", "via_waypoint": "VIA_WAYPOINT",
             "no_waypoint_endpoint": "NO_WAYPOINT_ENDPOINT"}


def _stamp(iso: str) -> str:
    """``2026-11-25T17:50:01.123Z`` -> ``Nov 25 17:50:01.123`` (hubble's compact time)."""
    try:
        t = time.strptime(iso[:19], "%Y-%m-%dT%H:%M:%S")
        return time.strftime("%b %d %H:%M:%S", t) + iso[19:23]
    except ValueError:
        return iso


def _addr(ip: str, port: Any) -> str:
    return f"[{ip}]:{port}" if ":" in (ip or "") else f"{ip}:{port}"


def short_service(name: str) -> str:
    """``ns/echo.ns.svc.cluster.local`` -> ``ns/echo`` (as hubble names services); others as is."""
    ns, sep, host = name.partition("/")
    if sep and host.startswith(f"{host.split('.', 1)[0]}.{ns}.svc."):
        return f"{ns}/{host.split('.', 1)[0]}"
    return name


def format_denied(rec: dict[str, Any]) -> str:
    """A connection attempt refused (or, dry run, that would be) by authorization policy."""
    src = rec.get("source") or {}
    be = rec.get("backend") or {}
    source = f"{src['namespace']}/{src['pod']}" if src.get("pod") else src.get("ip") or "?"
    if src.get("pod") and src.get("ip"):
        source += f" ({src['ip']})"
    dest = _addr(be.get("ip", ""), be.get("port", 0))
    if be.get("pod"):
        dest += f" ({be.get('namespace')}/{be['pod']})"
    what = "DENIED" if rec.get("kind") == "denied" else "WOULD BE DENIED (dry run)"
    n = int(rec.get("count", 1) or 1)
    return (f"{_stamp(rec.get('time', ''))}: {source} -> {dest} {what} ({rec.get('reason', '')})"
            + (f" x{n}" if n > 1 else ""))


def format_event(rec: dict[str, Any]) -> str:
    """One compact line for a trace record (see daemon.events.NameResolver.enrich)."""
    if rec.get("kind") in ("denied", "dry_run_denied"):  # authz records (daemon/authz/manager.py)
        return format_denied(rec)
    src = rec.get("source") or {}
    orig = rec.get("original") or {}
    be = rec.get("backend") or {}
    if src.get("pod"):
        source = f"{src.get('namespace')}/{src.get('pod')}"
    else:
        source = f"netns:{src.get('netns_cookie')}"
    dest = _addr(orig.get("ip", ""), orig.get("port", 0))
    if orig.get("service"):
        dest += f" ({short_service(orig['service'])})"
    verdict = _VERDICTS.get(rec.get("verdict", ""), str(rec.get("verdict", "")).upper())
    kind = rec.get("kind", "")
    line = f"{_stamp(rec.get('time', ''))}: {source} -> {dest}"
    if be.get("ip") and (be.get("ip"), be.get("port")) != (orig.get("ip"), orig.get("port")):
        pod = f"{be.get('namespace')}/{be.get('pod')}" if be.get("pod") else "?"
        via = "waypoint " if rec.get("verdict") == "via_waypoint" else ""  # be is the waypoint pod
        line += f" => {via}{pod} {_addr(be['ip'], be.get('port', 0))}"
    if kind == "connect":
        line += f" {verdict}"
    elif kind == "established":
        line += f" ESTABLISHED ({verdict.lower()})"
    elif kind == "close":
        line += (f" CLOSED sent={rec.get('bytes_sent', 0)}B recv={rec.get('bytes_received', 0)}B "
                 f"duration={rec.get('duration_ms', 0)}ms rtt={rec.get('srtt_us', 0)}us")
    else:
        line += f" {kind.upper()} {verdict}"
    return line


def monitoring_off_message(daemon: Daemon, namespace: str, name: str) -> str | None:
    """Why a trace would stay empty: access logs switched off on the pod's daemon (None: they are
    on, or the daemon predates the switch)."""
    try:
        state = daemon.get_json("/monitoring", timeout=10.0)
    except KmeshctlError:
        return None  # an older daemon (404) or a transient failure: the stream reports its own errors
    if state.get("access_log", True):
        return None
    where = f"node {daemon.node}" if daemon.node else daemon.label
    return (f"monitoring (access logs) is off on the kmesh daemon of {where} ({daemon.label}): no connection "
            f"events for {namespace}/{name} will be traced; turn it on with "
            f"`kmeshctl monitoring --accesslog enable` (or --all enable)")


def _daemon_for_pod(namespace: str, name: str, admin_addr: str | None, node: str | None,
                    kubeconfig: str | None, context: str | None) -> Daemon:
    daemons = find_daemons(admin_addr, node, kubeconfig, context)
    if len(daemons) == 1:
        return daemons[0]
    # Several nodes: ask the API where the pod runs.
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = daemons[0].api
    try:
        pod = client.CoreV1Api(api).read_namespaced_pod(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise KmeshctlError(f"pod {namespace}/{name} not found") from None
        raise
    for d in daemons:
        if d.node == pod.spec.node_name:
            return d
    raise KmeshctlError(f"pod {namespace}/{name} runs on node {pod.spec.node_name!r}, "
                        "where no kmesh daemon runs")


@trace_app.command("pod")
def trace_pod(
    name: Annotated[str, typer.Argument(help="Pod name (or NAMESPACE/NAME).")],
    namespace: Annotated[str, typer.Option("-n", "--namespace", help="Pod namespace.")] = "default",
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep streaming until interrupted.")] = False,
    count: Annotated[int, typer.Option("--count", help="Stop after N events (without -f).", min=1)] = 20,
    timeout: Annotated[float, typer.Option("--timeout", help="Stop after S seconds (without -f).")] = 30.0,
    output: Annotated[str, typer.Option("-o", "--output", help="compact or json (one object per line).")
                      ] = "compact",
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show a managed pod's connections: VIP, service, chosen backend, verdict, bytes, RTT."""
    if output not in ("compact", "json", "table"):
        raise UsageError(f"--output must be compact or json, not {output!r}")
    if "/" in name:
        namespace, name = name.split("/", 1)
    if timeout <= 0 and not follow:
        raise UsageError("--timeout must be > 0 (or use -f)")
    daemon = _daemon_for_pod(namespace, name, admin_addr, node, kubeconfig, context)
    off = monitoring_off_message(daemon, namespace, name)
    if off is not None:
        if not follow:
            raise KmeshctlError(off)
        warn(off + "; waiting (-f) in case it is switched on")
    params = {"pod": f"{namespace}/{name}"}
    if not follow:
        params.update({"count": str(count), "timeout": str(timeout)})
    n = 0
    try:
        for line in daemon.stream_lines(f"/debug/trace?{urlencode(params)}", idle_timeout=10.0):
            rec = json.loads(line)
            sys.stdout.write((json.dumps(rec) if output == "json" else format_event(rec)) + "\n")
            sys.stdout.flush()
            n += 1
    except KeyboardInterrupt:
        pass
    if not follow and n == 0:
        print(f"no connections from {namespace}/{name} within {timeout:g}s", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.add_typer(trace_app, name="trace")
