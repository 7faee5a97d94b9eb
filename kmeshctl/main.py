"""kmeshctl: install, enroll and inspect the Kmesh data plane.

Only typer and the command modules are imported at start; kubernetes, grpc and bcc are
imported inside the commands that use them so `kmeshctl --help` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="kmeshctl",
    help="Install, enroll and inspect the Kmesh sidecarless data plane.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each command module exposes register(app). Keep these imports light.
_COMMAND_MODULES: list[str] = [
]


def _register() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"kmeshctl.{name}").register(app)


def run() -> None:
    _register()
    app()


if __name__ == "__main__":
    run()
