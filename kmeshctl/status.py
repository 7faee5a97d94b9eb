"""``kmeshctl status``: is every daemon up, connected, enrolling, and do its maps have room?

Exit code 0 only when every daemon answers and reports ready (xDS connected and synced,
enrollment converged, no BPF map 90% full, the pod Ready when the API tells); 1 otherwise,
so scripts and CI can wait on it.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from kmeshctl.common import ContextOpt, KmeshctlError, KubeconfigOpt, UsageError, to_yaml
from kmeshctl.daemonlink import AdminAddrOpt, NodeOpt, fill_pod_readiness, find_daemons


def _short_type(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1] if type_url else type_url


def render_status(entry: dict[str, Any]) -> str:
    """One daemon's block of the human output."""
    st = entry.get("status") or {}
    head = f"kmesh daemon {entry['daemon']} on node {entry.get('node') or st.get('node') or '?'}: "
    if entry.get("error"):
        return head + f"UNREACHABLE\n  Error:      {entry['error']}\n"
    ready = entry.get("healthy")
    lines = [head + ("READY" if ready else "NOT READY")]
    if entry.get("pod_ready") is not None:
        lines.append(f"  Pod:        {'Ready' if entry['pod_ready'] else 'not Ready'}")
    xds = st.get("xds") or {}
    conn = "connected to" if xds.get("connected") else "NOT connected to"
    lines.append(f"  xDS:        {conn} {xds.get('address', '?')} as cluster {xds.get('cluster_id', '?')} "
                 f"(ACK {xds.get('acks', 0)}, NACK {xds.get('nacks', 0)}, "
                 f"reconnects {xds.get('reconnects', 0)})")
    if xds.get("last_error"):
        lines.append(f"  Last error: {xds['last_error']}")
    resources = xds.get("resources") or {}
    res = ", ".join(f"{_short_type(k)} {v}" for k, v in sorted(resources.items())) or "none"
    lines.append(f"  Resources:  {res}")
    enr = st.get("enrollment") or {}
    pods = enr.get("pods") or []
    namespaces = enr.get("namespaces") or []
    lines.append(f"  Enrolled:   {len(pods)} pods; namespaces labelled: {', '.join(namespaces) or 'none'}")
    for pod in pods:
        lines.append(f"              {pod['namespace']}/{pod['name']} (netns cookie {pod['netns_cookie']})")
    for waiting in enr.get("waiting") or []:
        lines.append(f"              {waiting} (waiting for its processes)")
    maps = st.get("maps") or {}
    if maps:
        top = sorted(maps.items(), key=lambda kv: -float(kv[1].get("ratio", 0)))
        parts = [f"{n} {m.get('entries', 0)}/{m.get('max', 0)} ({float(m.get('ratio', 0)):.1%})"
                 for n, m in top]
        for i in range(0, len(parts), 3):
            lines.append(f"  {'Maps:' if i == 0 else '':<12}{', '.join(parts[i:i + 3])}")
    problems = list(st.get("problems") or []) + list(entry.get("extra_problems") or [])
    lines.append(f"  Problems:   {'; '.join(problems) if problems else 'none'}")
    return "\n".join(lines) + "\n"


def status(
    output: Annotated[str, typer.Option("-o", "--output", help="table, json or yaml.")] = "table",
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Daemon health: pods ready, xDS connection, resources, enrolled pods, map pressure."""
    if output not in ("table", "json", "yaml"):
        raise UsageError(f"--output must be one of table, json, yaml, not {output!r}")
    daemons = find_daemons(admin_addr, node, kubeconfig, context)
    fill_pod_readiness(daemons, kubeconfig, context)
    entries = []
    for d in daemons:
        entry: dict[str, Any] = {"daemon": d.label, "node": d.node, "pod_ready": d.ready}
        try:
            st = d.get_json("/status", timeout=10.0)
            entry["status"] = st
            extra = [] if d.ready is not False else ["daemon pod is not Ready"]
            entry["extra_problems"] = extra
            entry["healthy"] = bool(st.get("ready")) and not extra
        except KmeshctlError as exc:
            entry["error"] = str(exc)
            entry["healthy"] = False
        entries.append(entry)
    healthy = all(e["healthy"] for e in entries)
    if output == "json":
        sys.stdout.write(json.dumps({"healthy": healthy, "daemons": entries}, indent=2) + "\n")
    elif output == "yaml":
        sys.stdout.write(to_yaml({"healthy": healthy, "daemons": entries}))
    else:
        sys.stdout.write("".join(render_status(e) for e in entries))
        ready = sum(1 for e in entries if e["healthy"])
        sys.stdout.write(f"\n{ready}/{len(entries)} daemons ready\n")
    sys.stdout.flush()
    if not healthy:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("status", help="Show daemon health; exit 1 when anything is unhealthy.")(status)
