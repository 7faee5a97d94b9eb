"""Shared helpers for every kmeshctl command: errors, kube options, client loading, output.

Conventions (issue 2, item 6), in one place so every command behaves the same:

- Failures raise ``KmeshctlError(message)``: main.py prints ``error: <message>`` (one line) on
  stderr and exits 1. Bad flags raise ``UsageError`` (exit 2). Never a traceback.
- Errors from the kubernetes client that a command does not handle itself are turned into one
  line by ``describe_exception`` (main.py calls it), e.g.
  ``cannot reach the Kubernetes API at http://127.0.0.1:6443: connection refused``.
- Human output (tables) goes to stdout; progress, notes and warnings go to stderr via
  ``note``/``warn``; ``-o json|yaml`` output on stdout is machine-clean.
- kubernetes is imported inside functions only, so ``kmeshctl --help`` stays fast.

Typical command::

    from kmeshctl.common import ContextOpt, KubeconfigOpt, OutputOpt, emit, load_kube

    def pods(kubeconfig: KubeconfigOpt = None, context: ContextOpt = None,
             output: OutputOpt = "table") -> None:
        api = load_kube(kubeconfig, context)
        ...
        emit(rows, output, columns=["NAME", "READY"])
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # pragma: no cover
    from kubernetes.client import ApiClient
    from rich.console import Console

OUTPUT_FORMATS = ("table", "json", "yaml")


class KmeshctlError(Exception):
    """A failure to report as one line (``error: <message>``) on stderr; exit code 1."""

    exit_code = 1


class UsageError(KmeshctlError):
    """Bad command-line input (a malformed or missing flag value); exit code 2."""

    exit_code = 2


# --- options shared by commands (typer Annotated aliases) -------------------------------

def _check_output(value: str | None) -> str | None:
    if value is not None and value not in OUTPUT_FORMATS:
        raise UsageError(f"--output must be one of {', '.join(OUTPUT_FORMATS)}, not {value!r}")
    return value


KubeconfigOpt = Annotated[
    str | None,
    typer.Option(
        "--kubeconfig",
        help="Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).",
        show_default=False,
    ),
]
ContextOpt = Annotated[
    str | None,
    typer.Option("--context", help="Kubeconfig context to use (default: the current context).",
                 show_default=False),
]
NamespaceOpt = Annotated[
    str,
    typer.Option("-n", "--namespace", help="Kubernetes namespace."),
]
AllNamespacesOpt = Annotated[
    bool,
    typer.Option("-A", "--all-namespaces", help="List across all namespaces (as kubectl -A)."),
]
ListNamespaceOpt = Annotated[
    str | None,
    typer.Option("-n", "--namespace", help="Only this namespace (default: all namespaces).",
                 show_default=False),
]


def namespace_scope(namespace: str | None, all_namespaces: bool) -> str | None:
    """The namespace a list is limited to, or None for all; -n with -A is a usage error (as kubectl)."""
    if namespace and all_namespaces:
        raise UsageError("give either -n/--namespace or -A/--all-namespaces, not both")
    return None if all_namespaces else (namespace or None)


OutputOpt = Annotated[
    str,
    typer.Option("-o", "--output", help="Output format: table, json or yaml.", callback=_check_output),
]


# --- stderr messages -----------------------------------------------------------------------

_err_console: Console | None = None


def err_console() -> Console:
    """A rich Console on stderr (progress displays, notes); shared so output interleaves well."""
    global _err_console
    if _err_console is None:
        from rich.console import Console

        _err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _err_console


def note(message: str) -> None:
    """An informational line on stderr (never on stdout, so -o json stays clean)."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --- Kubernetes client -----------------------------------------------------------------------

def _default_kubeconfig() -> str | None:
    env = os.environ.get("KUBECONFIG", "")
    paths = [p for p in env.split(os.pathsep) if p]
    if paths:
        existing = [p for p in paths if Path(p).expanduser().exists()]
        if not existing:
            raise KmeshctlError(f"KUBECONFIG names no existing file ({env}); set --kubeconfig")
        return os.pathsep.join(existing)
    home = Path("~/.kube/config").expanduser()
    return str(home) if home.exists() else None


_last_api_host: str | None = None  # for "cannot reach the Kubernetes API at <host>"


def load_kube(kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An ApiClient for --kubeconfig/--context ($KUBECONFIG, ~/.kube/config, in-cluster).

    Does not touch the kubernetes package's global default configuration, and turns off
    urllib3 retries so an unreachable API server fails at once with a clear error.
    """
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    path = kubeconfig
    if path is not None:
        if not Path(path).expanduser().exists():
            raise KmeshctlError(f"kubeconfig {path} does not exist")
    else:
        path = _default_kubeconfig()
    cfg = client.Configuration()
    try:
        if path is not None:
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg,
                                    persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            raise KmeshctlError("no kubeconfig: pass --kubeconfig, set KUBECONFIG or create ~/.kube/config")
    except ConfigException as e:
        raise KmeshctlError(f"invalid kubeconfig {path}: {_one_line(str(e))}") from None
    cfg.retries = False
    global _last_api_host
    _last_api_host = str(cfg.host)
    return client.ApiClient(configuration=cfg)


def context_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The namespace of the kubeconfig context (kubectl's default for -n), else ``default``."""
    from kubernetes import config

    path = kubeconfig or _default_kubeconfig()
    if path is None:
        return "default"
    try:
        contexts, active = config.list_kube_config_contexts(config_file=path)
    except Exception:  # an unreadable kubeconfig is reported by load_kube
        return "default"
    chosen = next((c for c in contexts or [] if c.get("name") == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace") or "default"


def api_host(api: ApiClient) -> str:
    """The API server URL the client talks to (for messages)."""
    return str(api.configuration.host)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def api_error_message(exc: BaseException) -> str | None:
    """The server's own message of a kubernetes ApiException (Status.message), else None."""
    body = getattr(exc, "body", None)
    status = getattr(exc, "status", None)
    if status is None or not type(exc).__module__.startswith("kubernetes"):
        return None
    if body:
        try:
            data = json.loads(body)
            if isinstance(data, dict) and data.get("message"):
                return _one_line(str(data["message"]))
        except (ValueError, TypeError):
            pass
    return _one_line(f"HTTP {status} {getattr(exc, 'reason', '') or ''}")


def _connection_reason(exc: BaseException) -> str:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cur, TimeoutError) or "timed out" in str(cur).lower():
            return "timed out"
        text = str(cur)
        if "Connection refused" in text:
            return "connection refused"
        if "Name or service not known" in text or "nodename nor servname" in text:
            return "unknown host"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "TLS certificate verification failed"
        cur = getattr(cur, "reason", None) if isinstance(getattr(cur, "reason", None), BaseException) \
            else (cur.__cause__ or cur.__context__)
    return _one_line(str(exc))[:200]


def describe_exception(exc: BaseException) -> str | None:
    """One line for errors raised by the kubernetes client / urllib3, else None.

    Used by main.py as the last line of defence, so any command gets e.g.
    ``cannot reach the Kubernetes API at http://127.0.0.1:1: connection refused``.
    """
    if isinstance(exc, KmeshctlError):
        return str(exc)
    module = type(exc).__module__
    if module.startswith("urllib3") or isinstance(exc, ConnectionError):
        where = _last_api_host or "the configured server"
        return f"cannot reach the Kubernetes API at {where}: {_connection_reason(exc)}"
    msg = api_error_message(exc)
    if msg is not None:
        return f"Kubernetes API: {msg}"
    return None


# --- output ----------------------------------------------------------------------------------

def to_yaml(data: Any) -> str:
    """YAML the way kubectl prints it (block style, keys in insertion order)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def to_yaml_documents(objects: Iterable[dict]) -> str:
    """Several objects as a multi-document YAML stream (``kubectl apply -f -`` reads it)."""
    return "".join("---\n" + to_yaml(o) for o in objects)


def emit(data: Any, output: str = "table", columns: Sequence[str] | None = None,
         title: str | None = None) -> None:
    """Print ``data`` on stdout as a table, JSON or YAML.

    For ``table``, ``data`` is a list of row dicts; ``columns`` names the keys to show (default:
    the first row's keys) and headers are the keys upper-cased, kubectl style. For json/yaml
    the data is printed as is (nothing else goes to stdout, so it can be piped).
    """
    if output == "json":
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif output == "yaml":
        sys.stdout.write(to_yaml(data))
    elif output == "table":
        rows: list[dict] = list(data or [])
        cols = list(columns) if columns else (list(rows[0].keys()) if rows else [])
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", title=title,
                      title_justify="left")
        for c in cols:
            table.add_column(c.upper(), overflow="fold")
        for row in rows:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in cols))
        Console(highlight=False, soft_wrap=True).print(table)
    else:
        raise UsageError(f"--output must be one of {', '.join(OUTPUT_FORMATS)}, not {output!r}")
    sys.stdout.flush()
