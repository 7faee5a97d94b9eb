"""``kmeshctl log [POD] [--set name:level]``: read or change a daemon's per-subsystem log levels."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from kmeshctl.common import ContextOpt, KubeconfigOpt, UsageError
from kmeshctl.daemonlink import AdminAddrOpt, NodeOpt, find_daemons
from kmeshctl.dump import format_table


def log(
    pod: Annotated[str | None, typer.Argument(help="Daemon pod (default: every daemon).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="NAME:LEVEL, e.g. xds:debug (repeatable).")
                    ] = None,
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Show the daemon loggers and their levels, or change them at runtime."""
    changes = []
    for item in set_ or []:
        name, sep, level = item.partition(":")
        if not sep or not name or not level:
            raise UsageError(f"--set {item!r}: expected NAME:LEVEL, e.g. xds:debug")
        changes.append({"name": name, "level": level})
    daemons = find_daemons(admin_addr, node, kubeconfig, context, pod_name=pod)
    for d in daemons:
        for change in changes:
            d.post_json("/debug/loggers", change)
        loggers = d.get_json("/debug/loggers")
        if len(daemons) > 1:
            sys.stdout.write(f"# {d.label} (node {d.node})\n")
        sys.stdout.write(format_table(("NAME", "LEVEL"), [(x["name"], x["level"]) for x in loggers]))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("log", help="Show or set a daemon's log levels per subsystem.")(log)
