"""kmeshctl behaviour that needs no API server: help, usage errors, --dry-run, unreachable API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cli.conftest import REPO, free_port, run_cli

XDS = "istiod.istio-system.svc:15012"


@pytest.mark.parametrize("args", [["--help"], ["install", "--help"], ["enable", "ns", "--help"], []])
def test_help_does_not_import_heavy_libraries(args: list[str]) -> None:
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "kmeshctl.main", *args],
                       capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert p.returncode == 0, p.stderr[-500:]
    assert "Usage" in p.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in p.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported  # guards the parsing of -X importtime output
    assert not imported & {"kubernetes", "grpc", "bcc", "urllib3"}, imported & {"kubernetes", "grpc", "bcc"}
    # typer's rich help imports rich.markdown and rich.traceback; the stand-ins keep
    # markdown-it and pygments out; http.client comes with the first admin request
    assert not imported & {"markdown_it", "pygments", "http"}, imported & {"markdown_it", "pygments", "http"}


def test_rich_stand_ins_build_the_real_objects() -> None:
    """The stand-ins for rich.markdown and rich.traceback (kmeshctl.main) load the real modules
    on first use: a Markdown renders, Traceback's classmethods work."""
    code = ("import sys; from kmeshctl.main import _defer_rich_imports; _defer_rich_imports()\n"
            "from rich.markdown import Markdown; from rich.traceback import Traceback\n"
            "from rich.console import Console\n"
            "c = Console(width=40, file=open('/dev/null', 'w'), record=True)\n"
            "m = Markdown('# hi *there*'); c.print(m)\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
            "    t = Traceback.from_exception(type(e), e, e.__traceback__)\n"
            "print(type(m).__module__, type(t).__module__, 'markdown_it' in sys.modules,\n"
            "      c.export_text().strip())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                       timeout=60)
    assert p.returncode == 0, p.stderr[-500:]
    assert p.stdout.split() == ["rich.markdown", "rich.traceback", "True", "hi", "there"]


USAGE_ERRORS = [
    (["--xds", "istiod"], "port is missing"),
    (["--xds", ":15012"], "host is empty"),
    (["--xds", "istiod:0"], "1 to 65535"),
    (["--xds", "istiod:65536"], "1 to 65535"),
    (["--xds", "istiod:http"], "1 to 65535"),
    (["--xds", "http://istiod:15012"], "scheme"),
    (["--xds", "ist iod:15012"], "not a valid host"),
    (["--xds", "fd00::1:15012"], "brackets"),
    (["--xds", "[fd00::zz]:15012"], "not an IPv6"),
    (["--xds", XDS, "--cluster-id", ""], "ACK cluster id"),
    (["--xds", XDS, "--cluster-id", "   "], "ACK cluster id"),
    (["--xds", XDS], "ACK cluster id"),
    (["--xds", XDS, "--cluster-id", "a b"], "not a valid cluster id"),
    (["--xds", XDS, "--cluster-id", "K", "--mode", "kernel-native"], "not supported"),
    (["--xds", XDS, "--cluster-id", "K", "-n", "Kmesh_System"], "not a valid namespace"),
    (["--xds", XDS, "--cluster-id", "K", "--dry-run", "-o", "table"], "yaml or json"),
    (["--xds", XDS, "--cluster-id", "K", "--timeout", "0"], "positive duration"),
    (["--xds", XDS, "--cluster-id", "K", "--image", "bad image"], "not a valid image"),
    (["--cluster-id", "K", "--dry-run"], "pass --xds"),
    (["--no-such-flag"], "No such option"),
]


@pytest.mark.parametrize(("args", "expected"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_install_usage_errors(args: list[str], expected: str, tmp_path: Path) -> None:
    r = run_cli("install", *args, kubeconfig=str(tmp_path / "absent"))
    assert r.code == 2, r
    assert r.out == ""
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("error: "), r.err
    assert expected in r.err
    assert "Traceback" not in r.err


def test_enroll_usage_errors(tmp_path: Path) -> None:
    for args in (["enable", "ns", "Bad_Name"], ["disable", "ns"], ["enable", "pod", "x", "-o", "table"]):
        r = run_cli(*args, kubeconfig=str(tmp_path / "absent"))
        assert r.code == 2, (args, r)
        assert len(r.err_lines) == 1 and r.err_lines[0].startswith("error: "), (args, r.err)


def test_dry_run_needs_no_kubeconfig(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": ""}
    r = run_cli("install", "--xds", XDS, "--cluster-id", "Kubernetes", "--dry-run",
                kubeconfig=str(tmp_path / "nope"), env=env)
    assert r.code == 0, r.err
    assert r.err == ""
    docs = [d for d in yaml.safe_load_all(r.out) if d]
    assert [d["kind"] for d in docs].count("EnvoyFilter") == 3 and len(docs) == 8
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    env_list = ds["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "XDS_ADDRESS", "value": XDS} in env_list
    image = ds["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("ghcr.io/kmesh-py/kmesh-daemon:")

    r = run_cli("install", "--xds", XDS, "--cluster-id", "Kubernetes", "--dry-run", "-o", "json",
                "--no-envoyfilters", "--image", "registry.example/kmesh:v1",
                kubeconfig=str(tmp_path / "nope"), env=env)
    assert r.code == 0, r.err
    lst = json.loads(r.out)
    assert lst["kind"] == "List" and len(lst["items"]) == 5
    (container,) = lst["items"][4]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/kmesh:v1"


def _closed_port_kubeconfig(tmp_path: Path) -> tuple[str, int]:
    port = free_port()
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return str(path), port


@pytest.mark.parametrize("args", [
    ["install", "--xds", XDS, "--cluster-id", "Kubernetes"],
    ["install", "--cluster-id", "Kubernetes"],
    ["uninstall"],
    ["enable", "ns", "default"],
    ["disable", "pod", "p", "-n", "default"],
])
def test_unreachable_api_server_is_one_line(args: list[str], tmp_path: Path) -> None:
    kubeconfig, port = _closed_port_kubeconfig(tmp_path)
    r = run_cli(*args, kubeconfig=kubeconfig)
    assert r.code == 1, r
    expected = f"error: cannot reach the Kubernetes API at http://127.0.0.1:{port}: connection refused"
    assert r.err_lines == [expected]
    assert r.out == ""


def test_missing_kubeconfig_is_one_line(tmp_path: Path) -> None:
    r = run_cli("enable", "ns", "default", "--kubeconfig", str(tmp_path / "missing"))
    assert r.code == 1 and r.out == ""
    assert len(r.err_lines) == 1 and re.match(r"error: kubeconfig .*missing does not exist", r.err_lines[0])
