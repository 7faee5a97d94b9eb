"""The /debug/config_dump body, per section and cached until the State changes.

Why: at 10,000 workloads the full dump is ~8 MB of JSON and ~0.2 s to build; ``kmeshctl dump
workloads`` needs only the workloads section (and services only to name waypoints), and
repeated dumps of an unchanged state should cost nothing. Sections are built with the same
functions ``State.config_dump`` uses (daemon.xds.dump), so the shapes are identical.
"""

from __future__ import annotations

import gzip
import json
import threading
from typing import Any

SECTIONS = ("workloads", "services", "policies")


class ConfigDumpCache:
    """Encoded dump bytes keyed by (sections, gzip), invalidated by any State change."""

    def __init__(self, state: Any) -> None:
        self._state = state
        self._gen = 0
        self._lock = threading.Lock()
        self._cache: dict[tuple[tuple[str, ...], bool], tuple[int, bytes]] = {}
        state.subscribe(self._on_change)

    def _on_change(self, _change: Any) -> None:
        self._gen += 1

    def build(self, sections: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
        if sections == SECTIONS:
            return self._state.config_dump()
        from daemon.xds import dump

        out: dict[str, list[dict[str, Any]]] = {}
        st = self._state
        if "workloads" in sections:
            rows = [dump.workload_json(dump.workload_message(r)) for r in list(st.workloads.values())]
            rows.sort(key=lambda w: (w["namespace"], w["name"], w["node"]))
            out["workloads"] = rows
        if "services" in sections:
            rows = [dump.service_json(dump.wl.Address.FromString(r.raw).service, st)
                    for r in list(st.services.values())]
            rows.sort(key=lambda s: (s["namespace"], s["hostname"]))
            out["services"] = rows
        if "policies" in sections:
            rows = [dump.policy_json(dump.az.Authorization.FromString(p.raw))
                    for p in list(st.policies.values())]
            rows.sort(key=lambda p: (p["namespace"], p["name"]))
            out["policies"] = rows
        return out

    def get(self, sections: tuple[str, ...] = SECTIONS, compress: bool = False) -> bytes:
        key = (sections, compress)
        gen = self._gen
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == gen:
                return hit[1]
        body = json.dumps(self.build(sections), separators=(",", ":")).encode() + b"\n"
        if compress:
            body = gzip.compress(body, compresslevel=1)
        with self._lock:
            self._cache[key] = (gen, body)
        return body


def parse_sections(value: str | None) -> tuple[str, ...]:
    """``types=workloads,services`` -> ordered tuple; ValueError names the valid sections."""
    if not value:
        return SECTIONS
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config_dump types {sorted(unknown)}; use {', '.join(SECTIONS)}")
    return tuple(s for s in SECTIONS if s in wanted)
