"""``kmeshctl version``: the client's version and each reachable daemon's."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from kmeshctl.common import ContextOpt, KmeshctlError, KubeconfigOpt
from kmeshctl.daemonlink import AdminAddrOpt, NodeOpt, find_daemons


def client_version() -> str:
    from daemon.version import version

    return f"v{version()}"


def version(
    pod: Annotated[str | None, typer.Argument(help="Daemon pod: print its full /version.")] = None,
    output: Annotated[str, typer.Option("-o", "--output", help="text or json.")] = "text",
    node: NodeOpt = None,
    admin_addr: AdminAddrOpt = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
) -> None:
    """Print the client version and the version of every daemon (a daemon that cannot be
    reached is a warning, not an error: the client version is still useful)."""
    daemons_info = []
    error = None
    try:
        for d in find_daemons(admin_addr, node, kubeconfig, context, pod_name=pod):
            info = d.get_json("/version")
            daemons_info.append({"daemon": d.label, "node": d.node, **info})
    except KmeshctlError as exc:
        error = str(exc)
    if output == "json":
        sys.stdout.write(json.dumps({"client": {"gitVersion": client_version()}, "daemons": daemons_info},
                                    indent=2) + "\n")
    elif pod and daemons_info:
        sys.stdout.write(json.dumps(daemons_info[0], indent=2) + "\n")
    else:
        sys.stdout.write(f"client version: {client_version()}\n")
        versions = sorted({d.get("gitVersion", "?") for d in daemons_info})
        if daemons_info:
            sys.stdout.write(f"kmesh-daemon version: {', '.join(versions)} ({len(daemons_info)} daemons)\n")
    if error:
        print(f"warning: daemon version unavailable: {error}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    app.command("version", help="Show the client and daemon versions.")(version)
