"""Structured logs to stderr with one level per subsystem, changeable while running.

Why: operators debug one subsystem at a time (``kmeshctl log --set xds:debug``) without
drowning in data-plane noise. Subsystems map onto the ``daemon.<name>`` logger tree, so a
module that logs through ``logging.getLogger(__name__)`` (``daemon.xds.client``) follows its
subsystem's level with no extra wiring. ``default`` is the ``daemon`` logger itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TextIO

from daemon.config import SUBSYSTEMS

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}
_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error",
          logging.CRITICAL: "error"}
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


# Subsystem -> logger trees it covers. Modules log under ``daemon.<pkg>`` (``__name__``) or
# under ``kmesh.<name>``; both trees are routed here.
ROOTS = ("daemon", "kmesh")
_TREES: dict[str, tuple[str, ...]] = {
    "default": ROOTS,
    "xds": ("daemon.xds", "kmesh.xds", "daemon.state", "kmesh.state"),
    "dataplane": ("daemon.dataplane", "kmesh.dataplane", "daemon.wiring", "kmesh.wiring"),
    "enroll": ("daemon.enroll", "kmesh.enroll"),
    "admin": ("daemon.admin", "kmesh.admin", "daemon.metrics", "daemon.events"),
    "bpf": ("daemon.bpf", "kmesh.bpf"),
}
_BY_PREFIX = sorted(((name, sub) for sub, names in _TREES.items() for name in names if sub != "default"),
                    key=lambda x: -len(x[0]))


def logger_name(subsystem: str) -> str:
    return _TREES[subsystem][0]


def get_logger(subsystem: str) -> logging.Logger:
    """The logger of one subsystem (``xds``, ``dataplane``, ``enroll``, ``admin``, ``bpf``)."""
    return logging.getLogger(logger_name(subsystem))


def _subsys(record: logging.LogRecord) -> str:
    for prefix, sub in _BY_PREFIX:
        if record.name == prefix or record.name.startswith(prefix + "."):
            return sub
    return "default" if record.name.split(".")[0] in ROOTS else record.name


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class StructuredFormatter(logging.Formatter):
    """``time=… level=… subsys=… msg="…" key=value`` (logfmt) or one JSON object per line.

    Extra fields come from ``logger.info("msg", extra={"pod": "ns/name"})``.
    """

    def __init__(self, fmt: str = "logfmt") -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": _NAMES.get(record.levelno, "info"),
            "subsys": _subsys(record),
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                fields[key] = value
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info).splitlines()[-1]
        if self.fmt == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def setup_logging(levels: dict[str, str] | None = None, fmt: str = "logfmt",
                  stream: TextIO | None = None) -> None:
    """Route every ``daemon.*`` logger to stderr; default level info."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(fmt))
    for root_name in ROOTS:
        root = logging.getLogger(root_name)
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        root.propagate = False
        root.setLevel(logging.INFO)
    for name in SUBSYSTEMS:
        if name != "default":
            for lname in _TREES[name]:
                logging.getLogger(lname).setLevel(logging.NOTSET)
    for name, level in (levels or {}).items():
        set_level(name, level)


def set_level(subsystem: str, level: str) -> None:
    """Change one subsystem's level at runtime; ValueError names the valid choices."""
    if subsystem not in SUBSYSTEMS:
        raise ValueError(f"unknown logger {subsystem!r}; loggers: {', '.join(SUBSYSTEMS)}")
    value = _LEVELS.get(str(level).lower())
    if value is None:
        raise ValueError(f"unknown level {level!r}; levels: debug, info, warn, error")
    for lname in _TREES[subsystem]:
        logging.getLogger(lname).setLevel(value)


def get_levels() -> dict[str, str]:
    """Effective level of every subsystem."""
    return {name: _NAMES.get(get_logger(name).getEffectiveLevel(), "info") for name in SUBSYSTEMS}
