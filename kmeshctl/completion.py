"""``kmeshctl completion bash|zsh|fish``: the shell script that completes kmeshctl's commands and flags.

Why a command (as kubectl/istioctl have) rather than typer's ``--install-completion``: printing the
script lets users source it or drop it wherever their shell looks, and nothing edits their rc files.
The script calls kmeshctl back with ``_KMESHCTL_COMPLETE=complete_<shell>``; ``register`` makes
typer's completion classes available for that call.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from kmeshctl.common import UsageError

SHELLS = ("bash", "zsh", "fish")
COMPLETE_VAR = "_KMESHCTL_COMPLETE"


def _init_classes() -> None:
    from typer._completion_classes import completion_init

    completion_init()


def completion(
    ctx: typer.Context,
    shell: Annotated[str, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print the completion script for SHELL on stdout: bash `source <(kmeshctl completion bash)`,
    zsh `kmeshctl completion zsh > "${fpath[1]}/_kmeshctl"`, fish `kmeshctl completion fish >
    ~/.config/fish/completions/kmeshctl.fish`."""
    if shell not in SHELLS:
        raise UsageError(f"unsupported shell {shell!r}; use one of {', '.join(SHELLS)}")
    _init_classes()
    from typer._click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - typer always registers the three
        raise UsageError(f"typer has no completion for {shell}")
    root = ctx.find_root().command  # the whole kmeshctl tree, however kmeshctl was started
    sys.stdout.write(cls(root, {}, "kmeshctl", COMPLETE_VAR).source().rstrip("\n") + "\n")


def register(app: typer.Typer) -> None:
    if os.environ.get(COMPLETE_VAR):  # the shell asking for completions: typer's classes answer
        _init_classes()
    app.command("completion", help="Print a shell completion script for bash, zsh or fish, e.g. "
                                   "`source <(kmeshctl completion bash)`.")(completion)
