"""Structured logs: one line per record, subsystem field, levels per subsystem at runtime."""

from __future__ import annotations

import io
import json
import logging

import pytest

from daemon import logging_setup


@pytest.fixture()
def stream() -> io.StringIO:
    buf = io.StringIO()
    logging_setup.setup_logging({"default": "info"}, "logfmt", stream=buf)
    yield buf
    logging_setup.setup_logging({}, "logfmt")


def test_logfmt_fields_and_subsystem(stream: io.StringIO) -> None:
    logging.getLogger("daemon.xds.client").info("stream up", extra={"address": "a:1", "note": "two words"})
    line = stream.getvalue().strip()
    assert line.startswith("time=") and "level=info" in line and "subsys=xds" in line
    assert 'msg="stream up"' in line and "address=a:1" in line and 'note="two words"' in line


def test_levels_per_subsystem_change_at_runtime(stream: io.StringIO) -> None:
    xds, enroll = logging.getLogger("daemon.xds.client"), logging.getLogger("daemon.enroll")
    xds.debug("hidden")
    logging_setup.set_level("xds", "debug")
    xds.debug("shown")
    enroll.debug("hidden too")
    out = stream.getvalue()
    assert "shown" in out and "hidden" not in out
    assert logging_setup.get_levels()["xds"] == "debug" and logging_setup.get_levels()["enroll"] == "info"
    with pytest.raises(ValueError, match="unknown logger"):
        logging_setup.set_level("nope", "debug")
    with pytest.raises(ValueError, match="unknown level"):
        logging_setup.set_level("xds", "loud")


def test_json_format() -> None:
    buf = io.StringIO()
    logging_setup.setup_logging({}, "json", stream=buf)
    try:
        logging.getLogger("daemon.enroll").warning("pod failed", extra={"pod": "ns/p"})
        rec = json.loads(buf.getvalue())
        assert rec["subsys"] == "enroll" and rec["level"] == "warn" and rec["pod"] == "ns/p"
    finally:
        logging_setup.setup_logging({}, "logfmt")
