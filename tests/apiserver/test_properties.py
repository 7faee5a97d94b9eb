"""Property tests of the pure pieces: selectors, strategic merge, field sets, server-side apply."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.apiserver.fieldmanager import field_set, from_fields_v1, server_side_apply, to_fields_v1
from sandbox.apiserver.patching import strategic_merge_patch
from sandbox.apiserver.selectors import parse_label_selector

KEYS = st.sampled_from(["app", "tier", "istio.io/rev", "k8s.io/x"])
VALUES = st.sampled_from(["a", "b", "c-1", "x.y"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)


@st.composite
def clauses(draw: st.DrawFn) -> tuple[str, Any]:
    key = draw(KEYS)
    kind = draw(st.sampled_from(["eq", "eq2", "ne", "in", "notin", "exists", "absent"]))
    vals = draw(st.lists(VALUES, min_size=1, max_size=3, unique=True))
    v = vals[0]
    return {
        "eq": (f"{key}={v}", lambda lb: lb.get(key) == v),
        "eq2": (f"{key}=={v}", lambda lb: lb.get(key) == v),
        "ne": (f"{key}!={v}", lambda lb: lb.get(key) != v),
        "in": (f"{key} in ({', '.join(vals)})", lambda lb: lb.get(key) in vals),
        "notin": (f"{key} notin ({','.join(vals)})", lambda lb: lb.get(key) not in vals),
        "exists": (key, lambda lb: key in lb),
        "absent": (f"!{key}", lambda lb: key not in lb),
    }[kind]


@settings(max_examples=200, deadline=None)
@given(st.lists(clauses(), min_size=1, max_size=4), LABELS)
def test_label_selector_matches_its_meaning(parts: list[tuple[str, Any]], labels: dict[str, str]) -> None:
    text = ",".join(t for t, _ in parts)
    expected = all(f(labels) for _, f in parts)
    assert parse_label_selector(text)({"metadata": {"labels": labels}}) is expected


CONTAINER = st.fixed_dictionaries(
    {"name": st.sampled_from(["main", "side", "init", "proxy"]), "image": st.sampled_from(["a:1", "b:2"])},
    optional={"args": st.lists(st.sampled_from(["-v", "-x"]), max_size=2)},
)


def _pod(containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "n"},
        "spec": {"containers": containers},
    }


def _unique(cs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list({c["name"]: c for c in cs}.values())


@settings(max_examples=150, deadline=None)
@given(st.lists(CONTAINER, max_size=4).map(_unique), st.lists(CONTAINER, max_size=4).map(_unique))
def test_strategic_merge_merges_containers_by_name(
    base: list[dict[str, Any]], patch: list[dict[str, Any]]
) -> None:
    out = strategic_merge_patch(_pod(base), {"spec": {"containers": patch}})["spec"]["containers"]
    names = [c["name"] for c in base] + [
        c["name"] for c in patch if c["name"] not in {b["name"] for b in base}
    ]
    assert [c["name"] for c in out] == names
    by_name = {c["name"]: c for c in out}
    for c in patch:
        for k, v in c.items():
            assert by_name[c["name"]][k] == v
    for c in base:
        for k, v in c.items():
            if k not in next((p for p in patch if p["name"] == c["name"]), {}):
                assert by_name[c["name"]][k] == v


@settings(max_examples=150, deadline=None)
@given(st.lists(CONTAINER, min_size=1, max_size=4).map(_unique), LABELS)
def test_fields_v1_round_trip(containers: list[dict[str, Any]], labels: dict[str, str]) -> None:
    obj = _pod(containers)
    obj["metadata"]["labels"] = labels
    paths = field_set(obj, builtin=True)
    assert from_fields_v1(to_fields_v1(paths)) == paths


@settings(max_examples=150, deadline=None)
@given(
    st.lists(CONTAINER, min_size=1, max_size=4).map(_unique),
    st.lists(CONTAINER, min_size=1, max_size=4).map(_unique),
)
def test_apply_is_idempotent_and_drops_what_is_no_longer_applied(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    one = server_side_apply(None, _pod(first), "m", False, True, "v1")
    two = server_side_apply(one, _pod(second), "m", False, True, "v1")
    # A sole manager's object holds exactly its latest config (live items keep their order, new
    # ones are appended, as strategic merge does).
    assert {c["name"]: c for c in two["spec"]["containers"]} == {c["name"]: c for c in second}
    kept = [c["name"] for c in first if c["name"] in {s["name"] for s in second}]
    assert [c["name"] for c in two["spec"]["containers"]][: len(kept)] == kept
    again = server_side_apply(two, _pod(second), "m", False, True, "v1")
    assert (
        again["spec"] == two["spec"]
        and again["metadata"]["managedFields"][0]["fieldsV1"]
        == two["metadata"]["managedFields"][0]["fieldsV1"]
    )
