"""Regenerate the README's CLI reference from the real `kmeshctl --help` output.

Usage: python scripts/gen_cli_reference.py [--check]
With --check, exit 1 (and say so) when README.md is stale instead of rewriting it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TYPER_USE_RICH"] = "0"  # plain click help: stable text for a README
os.environ["COLUMNS"] = "100"

import typer  # noqa: E402
import typer._click.core as click  # noqa: E402  (typer vendors click)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"


def _walk(cmd: click.Command, path: list[str], parent: click.Context | None) -> list[tuple[str, str]]:
    ctx = click.Context(cmd, info_name=path[-1], parent=parent, terminal_width=100, max_content_width=100)
    out = [(" ".join(path), cmd.get_help(ctx))]
    if hasattr(cmd, "list_commands"):
        for name in sorted(cmd.list_commands(ctx)):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not getattr(sub, "hidden", False):
                out.extend(_walk(sub, [*path, name], ctx))
    return out


def render() -> str:
    from kmeshctl import main

    main._register()
    root = typer.main.get_command(main.app)
    parts = [START, "", "## CLI reference", "", "Generated from the real `--help` by `make readme`.", ""]
    for name, text in _walk(root, ["kmeshctl"], None):
        parts += [f"### `{name}`", "", "```", text.rstrip(), "```", ""]
    parts.append(END)
    return "\n".join(parts)


def main() -> int:
    readme = REPO / "README.md"
    text = readme.read_text()
    block = render()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        new = head + block + tail
    else:
        new = text.rstrip("\n") + "\n\n" + block + "\n"
    if "--check" in sys.argv:
        if new != text:
            print("README.md CLI reference is stale: run `make readme`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
