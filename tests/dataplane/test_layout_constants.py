"""The KM_* constants of bpf/include/km_maps.h and their copies in daemon/dataplane/layout.py
agree (CPU only: parses the header's #defines)."""

from __future__ import annotations

import re
from pathlib import Path

from daemon.dataplane import layout as L

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "km_maps.h"


def defines() -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define (KM_\w+) (\d+)", HEADER.read_text(), re.M):
        out[m.group(1)] = int(m.group(2))
    return out


def test_constants_match() -> None:
    d = defines()
    pairs = {
        "KM_AF_INET": L.AF_INET, "KM_AF_INET6": L.AF_INET6, "KM_FE_SERVICE": L.FE_SERVICE,
        "KM_FE_BACKEND": L.FE_BACKEND, "KM_PRIOS": L.PRIOS, "KM_BE_HAS_V4": L.BE_HAS_V4,
        "KM_BE_HAS_V6": L.BE_HAS_V6, "KM_SK_TRANSLATED": L.SK_TRANSLATED, "KM_SK_WAYPOINT": L.SK_WAYPOINT,
        "KM_MON_ACCESSLOG": L.MON_ACCESSLOG, "KM_MON_METRICS": L.MON_METRICS, "KM_MON_ALL": L.MON_ALL,
        "KM_HO_TLV": L.HO_TLV, "KM_HO_PROXY": L.HO_PROXY, "KM_WP_UNRESOLVED": L.WP_UNRESOLVED,
    }
    assert {k: d.get(k) for k in pairs} == pairs
    verdicts = {d[k]: k for k in d if k.startswith("KM_V_")}
    assert set(verdicts) == set(L.VERDICTS), (verdicts, L.VERDICTS)
    assert {d[k] for k in d if k.startswith("KM_EV_")} == set(L.EVENT_KINDS)
    lb = Path(__file__).resolve().parents[2] / "bpf" / "include" / "km_lb.h"
    assert f"#define KM_HANDOFF_TLV_PORT {L.HANDOFF_TLV_PORT}" in lb.read_text()
