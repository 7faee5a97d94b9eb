"""``kmeshctl monitoring``: switch access logs and connection metrics on every kmesh daemon.

As Kmesh's ``kmeshctl monitoring --all enable|disable`` (and ``--accesslog``,
``--connectionMetrics``): each daemon's admin API ``POST /monitoring`` flips the ``km_config``
flag its BPF programs read on every connect. With both off the programs emit no ring-buffer
events and ask for no sockops state callbacks (the cheapest connect path); translation,
getpeername and waypoints are unaffected. Access logs = the connection events ``kmeshctl trace``
streams; connection metrics = the ``kmesh_tcp_*`` counters. With no switch (or ``status``) it
shows the state of every daemon; POD names daemon pods (default: every daemon).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from kmeshctl.common import ContextOpt, KubeconfigOpt, OutputOpt, UsageError, emit
from kmeshctl.daemonlink import AdminAddrOpt, Daemon, NodeOpt, _decode, find_daemons

SWITCH_VALUES = ("enable", "disable")
HOW_TO_ENABLE = "kmeshctl monitoring --accesslog enable"


def _switch(flag: str, value: str | None) -> str | None:
    """enable/disable -> "true"/"false" for the admin API; None when the flag is not given."""
    if value is None:
        return None
    if value not in SWITCH_VALUES:
        raise UsageError(f"{flag} {value!r}: use {flag} enable or {flag} disable")
    return "true" if value == "enable" else "false"


def monitoring_query(all_: str | None, accesslog: str | None, metrics: str | None) -> dict[str, str]:
    """The POST /monitoring parameters for the flags given ({} = only show the state)."""
    every = _switch("--all", all_)
    log_value = _switch("--accesslog", accesslog)
    metrics_value = _switch("--connectionMetrics", metrics)
    if every is not None and (log_value is not None or metrics_value is not None):
        raise UsageError("--all sets both switches; give either --all or --accesslog/--connectionMetrics")
    if every is not None:
        return {"enable": every}
    query = {}
    if log_value is not None:
        query["accesslog"] = log_value
    if metrics_value is not None:
        query["connectionMetrics"] = metrics_value
    return query


def _on_off(value: Any) -> str:
    return "enabled" if value else "disabled"


def row(daemon: Daemon, state: dict[str, Any]) -> dict[str, Any]:
    return {"pod": daemon.label, "node": daemon.node or state.get("node", ""),
            "accesslog": bool(state.get("access_log")), "connectionMetrics": bool(state.get("metrics"))}


def monitoring(
    pods: Annotated[list[str] | None, typer.Argument(
        help="Daemon pods (default: every daemon); `status` alone only shows the state.")] = None,
    all_: Annotated[str | None, typer.Option("--all", help="enable or disable access logs and "
                                             "connection metrics together.", show_default=False)] = None,
    accesslog: Annotated[str | None, typer.Option("--accesslog", help="enable or disable access logs "
                                                  "(connection events, kmeshctl trace).", show_default=False)
                         ] = None,
    metrics: Annotated[str | None, typer.Option(
        "--connectionMetrics", help="enable or disable the kmesh_tcp_* connection metrics.",
        show_default=False)] = None,
    output: OutputOpt = "table",
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Enable, disable or show access logs and connection metrics (the data plane's events)."""
    query = monitoring_query(all_, accesslog, metrics)  # bad input fails before any daemon is asked
    pods = list(pods or [])
    if pods and pods[0] == "status":
        if query:
            raise UsageError("`status` only shows the state; drop it to switch monitoring")
        pods = pods[1:]
    daemons: list[Daemon] = []
    if not pods:
        daemons = find_daemons(admin_addr, node, kubeconfig, context)
    for pod in pods:
        daemons += find_daemons(admin_addr, node, kubeconfig, context, pod_name=pod)
    rows = []
    for d in daemons:
        if query:
            status, data = d.request("POST", f"/monitoring?{urlencode(query)}")
            state = _decode(d, "/monitoring", status, data)
        else:
            state = d.get_json("/monitoring")
        rows.append(row(d, state))
    if output == "table":
        rows = [{**r, "accesslog": _on_off(r["accesslog"]),
                 "connectionMetrics": _on_off(r["connectionMetrics"])} for r in rows]
        emit(rows, output, columns=["pod", "node", "accesslog", "connectionMetrics"])
    else:
        emit(rows, output)


def register(app: typer.Typer) -> None:
    app.command("monitoring", help="Enable, disable or show access logs and connection metrics.")(monitoring)
