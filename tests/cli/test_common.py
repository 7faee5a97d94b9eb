"""kmeshctl.common: the output and error helpers every command shares."""

from __future__ import annotations

import json

import pytest
import yaml

from kmeshctl.common import KmeshctlError, UsageError, describe_exception, emit, to_yaml_documents

ROWS = [{"name": "web", "namespace": "default", "ready": True},
        {"name": "db", "namespace": "prod", "ready": None}]


def test_emit_table_json_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    emit(ROWS, "table", columns=["name", "ready"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "READY"] and lines[1].split() == ["web", "True"]
    assert lines[2].split() == ["db"]
    emit(ROWS, "json")
    assert json.loads(capsys.readouterr().out) == ROWS
    emit(ROWS, "yaml")
    assert yaml.safe_load(capsys.readouterr().out) == ROWS
    with pytest.raises(UsageError):
        emit(ROWS, "wide")
    docs = list(yaml.safe_load_all(to_yaml_documents([{"a": 1}, {"b": [1, 2]}])))
    assert docs == [{"a": 1}, {"b": [1, 2]}]


def test_error_types() -> None:
    assert KmeshctlError("x").exit_code == 1 and UsageError("x").exit_code == 2
    assert describe_exception(KmeshctlError("boom")) == "boom"
    assert describe_exception(ValueError("other")) is None
    from kubernetes.client.exceptions import ApiException

    e = ApiException(status=403, reason="Forbidden")
    e.body = json.dumps({"kind": "Status", "message": 'namespaces "x" is forbidden: User "u" cannot patch'})
    assert describe_exception(e) == 'Kubernetes API: namespaces "x" is forbidden: User "u" cannot patch'
