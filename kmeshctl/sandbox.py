"""`kmeshctl sandbox up|down|status|exec`: the whole walkthrough on one machine, no cluster needed.

The sandbox stands in for a cluster's API server, istiod (revision 1-22-6) and one node; see
sandbox/up.py for what it creates and where ($KMESH_SANDBOX_DIR, default ~/.kmesh/sandbox).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kmeshctl.common import AllNamespacesOpt, KmeshctlError, ListNamespaceOpt, UsageError, namespace_scope

DirOpt = Annotated[
    str | None,
    typer.Option(
        "--dir",
        help="Sandbox state directory (default: $KMESH_SANDBOX_DIR, else ~/.kmesh/sandbox).",
        show_default=False,
    ),
]


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _xds_ports(value: str | None) -> tuple[int, int] | None:
    """``TLS,PLAINTEXT`` ports, ``auto`` (two free ports), or None (istiod's 15012,15010)."""
    from sandbox import up as sb

    if value is None:
        return None
    if value == "auto":
        return sb.free_port(), sb.free_port()
    parts = value.split(",")
    if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) < 65536 for p in parts):
        raise UsageError(f"--xds-ports {value!r}: give TLS,PLAINTEXT (e.g. 15012,15010) or auto")
    return int(parts[0]), int(parts[1])


def up(
    directory: DirOpt = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait until ready.")] = 60.0,
    xds_ports: Annotated[str | None, typer.Option(
        "--xds-ports", show_default=False,
        help="istiod stand-in ports TLS,PLAINTEXT (default 15012,15010 as istiod), or auto for free ones "
             "(then install with --xds istiod-1-22-6.istio-system.svc:PORT).")] = None,
) -> None:
    """Start the sandbox API server, control plane and node (in the background)."""
    from sandbox import up as sb

    ports = _xds_ports(xds_ports)
    try:
        st = sb.up(Path(directory) if directory else None, timeout=timeout, log=_note,
                   **({"xds_ports": ports} if ports else {}))
    except sb.SandboxError as e:
        raise KmeshctlError(str(e)) from None
    _note(
        f"sandbox is up: cluster id {st.cluster_id}, istiod-{st.revision} in istio-system, "
        f"node ready, prefix {st.prefix}"
    )
    print(f"export KUBECONFIG={st.kubeconfig}")


def down(directory: DirOpt = None) -> None:
    """Stop the sandbox and remove everything it made (also after a crash; safe to repeat)."""
    from sandbox import up as sb

    done = sb.down(Path(directory) if directory else None)
    if not done:
        _note("no sandbox is running; nothing to remove")
        return
    for item in done:
        _note(f"removed {item}")
    _note("sandbox is down")


def status(
    directory: DirOpt = None,
    output: Annotated[str, typer.Option("-o", "--output", help="table or json.")] = "table",
    namespace: ListNamespaceOpt = None,
    all_namespaces: AllNamespacesOpt = False,
) -> None:
    """Show what the sandbox runs (pods of all namespaces unless -n)."""
    from sandbox import up as sb

    if output not in ("table", "json"):
        raise UsageError(f"--output must be table or json, not {output!r}")
    only = namespace_scope(namespace, all_namespaces)
    info = sb.status(Path(directory) if directory else None)
    if only is not None and info.get("pods"):
        info["pods"] = [p for p in info["pods"] if p["namespace"] == only]
    if output == "json":
        print(json.dumps(info, indent=2))
        return
    if not info.get("prefix"):
        print(f"no sandbox in {info['dir']} (start one with `kmeshctl sandbox up`)")
        raise typer.Exit(1)
    print(f"sandbox      {'running' if info['running'] else 'NOT running (supervisor gone)'} ({info['dir']})")
    print(f"cluster id   {info['clusterId']}")
    print(f"kubeconfig   {info['kubeconfig']}")
    print(f"api server   {info['apiServer']}")
    print(f"cgroup root  {info['cgroupRoot']}")
    print(f"pins         {info['pinDir']}")
    print(f"daemon       {info.get('daemonRuntime', 'unknown')}")
    print(f"{'COMPONENT':<11}{'PID':>8}  {'STATE':<9} DETAIL")
    for name, c in info["components"].items():
        state = "ready" if c["ready"] else ("starting" if c["running"] else "stopped")
        print(f"{name:<11}{c['pid']:>8}  {state:<9} {c['detail']}")
    if info["pods"]:
        print(f"{'NAMESPACE':<16}{'POD':<40}{'PHASE':<10}IP")
        for p in info["pods"]:
            print(f"{p['namespace']:<16}{p['name']:<40}{p['phase']:<10}{p['ip'] or ''}")
    if not info["running"]:
        raise typer.Exit(1)


def _find_pod(directory: Path, name: str, namespace: str) -> dict:
    pods = []
    for f in (directory / "kubelet" / "pods").glob("*/pod.json"):
        try:
            pods.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    in_ns = [p for p in pods if p["namespace"] == namespace]
    exact = [p for p in in_ns if p["name"] == name]
    if not exact:
        # `exec netutils -- ...`: the one pod of a Deployment/DaemonSet named like that.
        exact = [p for p in in_ns if p["name"].startswith(name + "-")]
    if not exact:
        names = ", ".join(sorted(p["name"] for p in in_ns)) or "none"
        raise KmeshctlError(
            f"no running pod {name!r} in namespace {namespace!r} on the sandbox node (pods there: {names})"
        )
    if len(exact) > 1:
        raise KmeshctlError(
            f"{name!r} matches several pods in {namespace!r}: "
            f"{', '.join(sorted(p['name'] for p in exact))}; give the full name"
        )
    return exact[0]


def exec_(
    pod: Annotated[str, typer.Argument(help="Pod name, or its owner: NAME, deploy/NAME, ds/NAME.")],
    command: Annotated[list[str], typer.Argument(help="Command and arguments (after --).")],
    namespace: Annotated[str, typer.Option("-n", "--namespace", help="Namespace.")] = "default",
    container: Annotated[
        str | None, typer.Option("-c", "--container", help="Container name.", show_default=False)
    ] = None,
    directory: DirOpt = None,
) -> None:
    """Run a command in a sandbox pod's network, mount namespace and cgroup; exit with its code."""
    from sandbox import up as sb

    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError(
            "give the command to run after --, e.g. "
            "`kmeshctl sandbox exec netutils -n default -- curl -sI fortio`"
        )
    d = sb.sandbox_dir(directory)
    if sb.State.load(d) is None:
        raise KmeshctlError(f"no sandbox in {d}; start one with `kmeshctl sandbox up`")
    kind, _, name = pod.rpartition("/")
    if kind not in ("", "pod", "pods", "po", "deploy", "deployment", "deployments", "ds", "daemonset"):
        raise UsageError(f"{pod!r}: give a pod name, or deploy/NAME or ds/NAME")
    info = _find_pod(d, name, namespace)
    containers = info.get("containers") or {}
    if not containers:
        raise KmeshctlError(f"pod {namespace}/{info['name']} has no running container")
    if container is None:
        container = next(iter(containers))
    if container not in containers:
        raise KmeshctlError(
            f"pod {namespace}/{info['name']} has no running container {container!r} "
            f"(running: {', '.join(containers)})"
        )
    from sandbox.kubelet.launch import enter_argv, enter_env

    argv = enter_argv(info, container, command)
    sys.stdout.flush()
    sys.stderr.flush()
    env = enter_env()
    os.execve(sys.executable, argv, env)


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Run the walkthrough on this machine: API server, istiod stand-in and one node.",
        no_args_is_help=True,
    )
    group.command("up")(up)
    group.command("down")(down)
    group.command("status")(status)
    # Options may come before or after POD (kubectl's `exec POD -n ns -- cmd`); everything after `--`
    # is the command, never an option of ours.
    group.command("exec")(exec_)
    app.add_typer(group, name="sandbox")
