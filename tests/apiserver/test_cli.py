"""``python -m sandbox.apiserver`` as a process: ready line, kubeconfig, clean stop, bad input."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client, config

from tests.support.kubectl import kubectl_path

REPO = Path(__file__).resolve().parents[2]


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sandbox.apiserver", *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    tmp = tmp_path_factory.mktemp("apiserver-cli")
    kubeconfig = tmp / "kube" / "config"
    proc = _spawn("--port", "0", "--kubeconfig", str(kubeconfig), "--state-dir", str(tmp / "state"))
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.fullmatch(r"apiserver ready on (http://127\.0\.0\.1:\d+)\n", line)
        assert m, f"unexpected first stderr line {line!r}"
        yield proc, kubeconfig, m.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def test_ready_line_and_kubeconfig(process: tuple[subprocess.Popen[str], Path, str]) -> None:
    _, kubeconfig, url = process
    cfg = yaml.safe_load(kubeconfig.read_text())
    assert cfg["current-context"] == "sandbox"
    assert cfg["clusters"][0]["cluster"]["server"] == url
    assert cfg["users"][0]["user"]["token"]
    assert oct(kubeconfig.stat().st_mode & 0o777) == "0o600"
    api = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        names = [n.metadata.name for n in client.CoreV1Api(api).list_namespace().items]
    finally:
        api.close()
    assert {"default", "kube-system"} <= set(names)
    out = subprocess.run(
        [kubectl_path(), "--kubeconfig", str(kubeconfig), "get", "ns", "default", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "namespace/default", out.stderr


def test_state_dir_keeps_signing_key(process: tuple[subprocess.Popen[str], Path, str]) -> None:
    _, kubeconfig, _ = process
    key = kubeconfig.parent.parent / "state" / "sa.key"
    assert key.exists() and oct(key.stat().st_mode & 0o777) == "0o600"


def test_sigterm_stops_cleanly(process: tuple[subprocess.Popen[str], Path, str]) -> None:
    proc, _, url = process
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bad_port_is_a_usage_error(tmp_path: Path) -> None:
    proc = _spawn("--port", "70000", "--kubeconfig", str(tmp_path / "kc"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert err.strip().splitlines() == ["error: --port 70000 is out of range; give 0-65535"]
    assert not (tmp_path / "kc").exists()


def test_port_in_use_fails_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = _spawn("--port", str(port), "--kubeconfig", str(tmp_path / "kc"))
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot start the API server on 127.0.0.1:{port}")
    assert not os.path.exists(tmp_path / "kc")
