"""Fixtures of the sandbox tests: one node runtime per module, always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.kubelet.runtime import Runtime


@pytest.fixture(scope="module")
def runtime(
    run_prefix: str, test_cgroup: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runtime]:
    """A node runtime under the test cgroup, prefix `<run_prefix>s` (own netns names)."""
    rt = Runtime(tmp_path_factory.mktemp("node"), test_cgroup / f"{run_prefix}-rt", f"{run_prefix}s")
    rt.setup()
    try:
        yield rt
    finally:
        rt.teardown()
