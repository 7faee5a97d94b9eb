"""Packaging glue that pyproject.toml cannot express: the non-Python trees of the checkout.

``manifests/`` (install templates, EnvoyFilters, samples) and ``bpf/`` (the C sources and
headers the loader compiles at daemon start) live at the top of the repository, where people
edit them. In a wheel they travel as data packages ``kmesh_assets.manifests`` and
``kmesh_assets.bpf``; ``daemon.assets`` finds them in either place. Everything else (metadata,
scripts, dependencies) is in pyproject.toml.
"""

from pathlib import Path

from setuptools import find_namespace_packages, setup

HERE = Path(__file__).resolve().parent
ASSET_TREES = ("manifests", "bpf")


def asset_packages() -> dict[str, str]:
    """``kmesh_assets.<tree>[.<subdir>...]`` -> source directory, for every directory of each tree."""
    out: dict[str, str] = {}
    for tree in ASSET_TREES:
        for d in sorted(p for p in [HERE / tree, *(HERE / tree).rglob("*")] if p.is_dir()):
            if d.name == "__pycache__":
                continue
            rel = d.relative_to(HERE)
            out["kmesh_assets." + ".".join(rel.parts)] = rel.as_posix()
    return out


ASSETS = asset_packages()
setup(
    packages=find_namespace_packages(include=["kmeshctl*", "daemon*", "sandbox*", "waypoint*"],
                                      exclude=["*.__pycache__"]) + sorted(ASSETS),
    package_dir=ASSETS,
    package_data={"": ["*.proto", "*.yaml", "*.yml", "*.c", "*.h", "*.j2", "*.md", "*.json", "*.conf"],
                  **{p: ["*"] for p in ASSETS}},
)
