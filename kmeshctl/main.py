"""kmeshctl: install, enroll and inspect the Kmesh data plane.

Only typer and the command modules are imported at start; kubernetes, grpc and bcc are
imported inside the commands that use them so `kmeshctl --help` stays fast.

Exit codes: 0 success, 1 failure (one ``error: ...`` line on stderr), 2 usage error. No
traceback is ever printed (set KMESHCTL_DEBUG=1 to see one).
"""

from __future__ import annotations

import os
import sys

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
    "install",
    "enroll",
    "dump",
    "trace",
    "status",
    "logcmd",
    "version",
    "sandbox",
    "waypoint",
    "authz",
    "monitoring",
    "completion",
]


# rich modules that typer's help renderer imports at import time but never uses for our help:
# rich.markdown (markdown-it) and rich.traceback (pygments), ~90 ms of a ~280 ms `--help`.
_DEFERRED = {"rich.markdown": "Markdown", "rich.traceback": "Traceback"}


def _defer_rich_imports() -> None:
    """Stand light modules in for _DEFERRED: each holds a stand-in class that imports the real
    module the first time the class is called or one of its attributes is read, then answers
    with the real class. Nothing changes in what is printed; only the unused import goes."""
    import types

    for modname, clsname in _DEFERRED.items():
        if modname in sys.modules:
            continue
        stand_in = types.ModuleType(modname, "loads the real module on first use")

        def real(modname: str = modname, clsname: str = clsname,
                 stand_in: types.ModuleType = stand_in) -> type:
            import importlib

            if sys.modules.get(modname) is stand_in:
                del sys.modules[modname]
            return getattr(importlib.import_module(modname), clsname)

        class Lazy(type):
            def __call__(cls, *args: object, **kwargs: object) -> object:
                return cls._real()(*args, **kwargs)  # type: ignore[attr-defined]

            def __getattr__(cls, attr: str) -> object:
                return getattr(cls._real(), attr)  # type: ignore[attr-defined]

        setattr(stand_in, clsname, Lazy(clsname, (), {"_real": staticmethod(real)}))
        sys.modules[modname] = stand_in


def _register() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"kmeshctl.{name}").register(app)


def _fail(message: str, code: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return code


def _click_exceptions() -> tuple[type[BaseException], type[BaseException], type[BaseException]]:
    """(ClickException, Exit, Abort) of the click that typer uses (vendored in newer typer)."""
    click_error = next((c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"),
                       typer.BadParameter)
    return click_error, typer.Exit, typer.Abort


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return the exit code (never raises, never prints a traceback)."""
    click_error, click_exit, click_abort = _click_exceptions()
    from kmeshctl.common import KmeshctlError, describe_exception

    try:
        _defer_rich_imports()
        _register()
        rv = app(args=argv, prog_name="kmeshctl", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except KmeshctlError as e:
        return _fail(str(e), e.exit_code)
    except click_exit as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except click_abort:
        return _fail("aborted", 130)
    except click_error as e:
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            # A bare group: its help (typer's rich help is already printed while the error is
            # built; plain help is in the message). Root: exit 0 like kubectl; sub-group: 2.
            text = e.format_message()
            if text.strip():
                print(text)
            return 0 if ctx.parent is None else 2
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _fail(f"{e.format_message()}{hint}", getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:
        return 1
    except Exception as e:  # the last line of defence: one line, no traceback
        if os.environ.get("KMESHCTL_DEBUG"):
            raise
        try:
            msg = describe_exception(e)
        except Exception:
            msg = None
        return _fail(msg if msg is not None else f"unexpected {type(e).__name__}: {e}", 1)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
