"""kubectl habits on every kmeshctl command: walks the whole command tree, so new commands are covered.

Checks (issue 16): each command's --help works; a common flag has the same short form and meaning
everywhere (-n/--namespace, -o/--output, -A/--all-namespaces, -c/--container, --kubeconfig and
--context together); flags are accepted after positional arguments (no command turns interspersed
arguments off); `kmeshctl completion bash|zsh|fish` prints a script that completes commands.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmeshctl.main import _register, app

REPO = Path(__file__).resolve().parents[2]
KMESHCTL = [sys.executable, "-m", "kmeshctl.main"]
# long flag -> the short form it must have wherever it exists (None: no short form anywhere)
COMMON = {
    "--namespace": "-n",
    "--output": "-o",
    "--all-namespaces": "-A",
    "--container": "-c",
    "--kubeconfig": None,
    "--context": None,
    "--help": None,
}


@functools.cache
def _cli() -> object:
    from typer.main import get_command

    _register()
    return get_command(app)


def _tree() -> Iterator[tuple[list[str], object]]:
    root = _cli()

    def walk(path: list[str], cmd: object) -> Iterator[tuple[list[str], object]]:
        yield path, cmd
        for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
            if not getattr(sub, "hidden", False):
                yield from walk([*path, name], sub)

    yield from walk([], root)


COMMANDS = [(path, cmd) for path, cmd in _tree() if path]
LEAVES = [(path, cmd) for path, cmd in COMMANDS if not getattr(cmd, "commands", None)]


def _options(cmd: object) -> list[object]:
    return [p for p in cmd.params if getattr(p, "param_type_name", "") == "option"]  # type: ignore[attr-defined]


def test_the_walk_sees_the_commands_users_know() -> None:
    names = {" ".join(p) for p, _ in COMMANDS}
    for expected in (
        "install",
        "uninstall",
        "dump",
        "status",
        "log",
        "version",
        "enable ns",
        "disable pod",
        "trace pod",
        "sandbox up",
        "sandbox exec",
        "sandbox status",
        "completion",
    ):
        assert expected in names, f"{expected!r} missing from {sorted(names)}"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p))
def test_help_works_everywhere(path: list[str]) -> None:
    r = subprocess.run(
        [*KMESHCTL, *path, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert f"Usage: kmeshctl {' '.join(path)}" in " ".join(r.stdout.split()), r.stdout[:300]
    assert r.stderr == ""


@pytest.mark.parametrize(("path", "cmd"), LEAVES, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_common_flags_are_the_same_everywhere(path: list[str], cmd: object) -> None:
    where = " ".join(path)
    longs: set[str] = set()
    for opt in _options(cmd):
        names = list(opt.opts) + list(opt.secondary_opts)  # type: ignore[attr-defined]
        shorts = {n for n in names if not n.startswith("--")}
        for n in names:
            if n in COMMON:
                longs.add(n)
                want = COMMON[n]
                assert shorts == ({want} if want else set()), (
                    f"{where}: {n} has short form {shorts or 'none'}"
                )
        for long, short in COMMON.items():
            if short and short in shorts:
                assert long in names, f"{where}: {short} means {names}, everywhere else it is {long}"
    if "--kubeconfig" in longs or "--context" in longs:
        assert {"--kubeconfig", "--context"} <= longs, f"{where}: --kubeconfig and --context go together"
    assert getattr(cmd, "context_settings", {}).get("allow_interspersed_args") is not False, (
        f"{where}: flags must be accepted after positional arguments"
    )


def _ctx(args: list[str]) -> dict:
    """Parse `kmeshctl ARGS` down to the leaf command without running it; returns its params."""
    cmd = _cli()
    ctx = cmd.make_context("kmeshctl", list(args))  # type: ignore[attr-defined]
    while getattr(ctx.command, "commands", None):
        # click keeps the subcommand name apart (protected_args; _protected_args in click >= 8.2)
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])
        name, *rest = [*protected, *ctx.args]
        sub = ctx.command.get_command(ctx, name)
        ctx = sub.make_context(name, rest, parent=ctx)
    return ctx.params


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (
            ["sandbox", "exec", "netutils", "-n", "demo", "--", "sh", "-c", "echo ok"],
            {"pod": "netutils", "namespace": "demo", "command": ["sh", "-c", "echo ok"]},
        ),
        (
            ["sandbox", "exec", "-n", "demo", "netutils", "--", "sh", "-c", "echo -n x"],
            {"namespace": "demo", "command": ["sh", "-c", "echo -n x"]},
        ),
        (
            ["trace", "pod", "client", "-n", "demo", "-o", "json"],
            {"name": "client", "namespace": "demo", "output": "json"},
        ),
        (["enable", "ns", "demo", "--dry-run"], {"names": ["demo"], "dry_run": True}),
        (["disable", "pod", "a", "-n", "demo", "b", "--dry-run"], {"names": ["a", "b"], "namespace": "demo"}),
        (["dump", "workloads", "-A"], {"kind": "workloads", "all_namespaces": True}),
        (["dump", "services", "-n", "demo", "-o", "yaml"], {"namespace": "demo", "output": "yaml"}),
        (["sandbox", "status", "-A", "-o", "json"], {"all_namespaces": True, "output": "json"}),
        (["version", "kmesh-abc", "-o", "json"], {"pod": "kmesh-abc", "output": "json"}),
        (["waypoint", "list", "-A", "-o", "json"], {"all_namespaces": True}),
        (["completion", "zsh"], {"shell": "zsh"}),
    ],
)
def test_flags_before_or_after_positionals(args: list[str], expect: dict) -> None:
    params = _ctx(args)
    for k, v in expect.items():
        assert params.get(k) == v, f"kmeshctl {' '.join(args)}: {k}={params.get(k)!r}, want {v!r}"


def test_namespace_and_all_namespaces_conflict() -> None:
    r = subprocess.run(
        [*KMESHCTL, "dump", "workloads", "-n", "a", "-A"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 2 and "not both" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    r = subprocess.run([*KMESHCTL, "completion", shell], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and "_KMESHCTL_COMPLETE=complete_" + shell in r.stdout, r.stderr


def test_bash_completion_answers() -> None:
    """The script's callback: `kmeshctl sandbox e<TAB>` -> exec; `kmeshctl dump -<TAB>` lists -A."""

    def complete(words: str, cword: int) -> list[str]:
        env = {
            **os.environ,
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
            "_KMESHCTL_COMPLETE": "complete_bash",
        }
        r = subprocess.run(KMESHCTL, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert complete("kmeshctl sandbox e", 2) == ["exec"]
    assert "--all-namespaces" in complete("kmeshctl dump workloads --", 3)
    assert "completion" in complete("kmeshctl co", 1)
