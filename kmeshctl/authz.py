"""``kmeshctl authz enable|disable|status [POD...]``: switch in-kernel L4 authorization.

As Kmesh's ``kmeshctl authz``: POD names daemon pods (default: every daemon); the daemon's
admin API ``POST /authz?enable=true|false`` flips the flag its BPF program reads. Unlike
Kmesh's, ``status`` reads the state back (``GET /authz``) and prints ``POD  AUTHORIZATION STATUS``.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from kmeshctl.common import ContextOpt, KubeconfigOpt, UsageError
from kmeshctl.daemonlink import AdminAddrOpt, Daemon, NodeOpt, find_daemons
from kmeshctl.dump import format_table

ACTIONS = ("enable", "disable", "status")


def _daemons(pods: list[str] | None, node: str | None, admin_addr: str | None, kubeconfig: str | None,
             context: str | None) -> list[Daemon]:
    if not pods:
        return find_daemons(admin_addr, node, kubeconfig, context)
    out: list[Daemon] = []
    for pod in pods:
        out += find_daemons(admin_addr, node, kubeconfig, context, pod_name=pod)
    return out


def authz(
    action: Annotated[str, typer.Argument(help="enable, disable or status.")],
    pods: Annotated[list[str] | None, typer.Argument(help="Daemon pods (default: every daemon).")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json.")] = "table",
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Enable, disable or show authorization (AuthorizationPolicy enforcement in the kernel)."""
    if action not in ACTIONS:
        raise UsageError(f"unknown authz action {action!r}; use one of {', '.join(ACTIONS)}")
    if output not in ("table", "json"):
        raise UsageError(f"--output must be table or json, not {output!r}")
    rows: list[dict[str, Any]] = []
    for d in _daemons(pods, node, admin_addr, kubeconfig, context):
        if action == "status":
            st = d.get_json("/authz")
        else:
            status, data = d.request("POST", f"/authz?enable={'true' if action == 'enable' else 'false'}")
            from kmeshctl.daemonlink import _decode

            st = _decode(d, "/authz", status, data)
        rows.append({"pod": d.label, "node": d.node, "enabled": bool(st.get("enabled")),
                     "policies": st.get("policies", 0), "linked_pods": st.get("linked_pods", 0)})
    if output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    if action == "status":
        sys.stdout.write(format_table(("POD", "AUTHORIZATION STATUS"),
                                      [(r["pod"], "enabled" if r["enabled"] else "disabled") for r in rows]))
    else:
        for r in rows:
            sys.stdout.write(f"{r['pod']}: authorization {'enabled' if r['enabled'] else 'disabled'}\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("authz", help="Enable, disable or show in-kernel authorization (AuthorizationPolicy).")(authz)
