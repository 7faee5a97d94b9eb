"""The real daemon (python -m daemon) against the sandbox API server and pilot, pods as netns.

Tests run in file order on one module-scoped environment (conftest.env); the restart test is
last because it kills the daemon.
"""

from __future__ import annotations

import pytest

from tests.daemon.conftest import Env, wait_for

pytestmark = pytest.mark.kernel


def test_enrolling_namespace_annotates_pods_and_translates(env: Env) -> None:
    # Not labelled yet: nothing enrolled, the VIP is not translated (no route to it in the pod).
    wait_for(lambda: env.status()["enrollment"]["converged"], 60, "enrollment converged")
    assert env.enrolled() == set()
    r = env.connect("cli", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
    env.label_namespace("Kmesh")
    wait_for(lambda: {"cli", "be1", "be2"} <= env.enrolled(), 30, "pods enrolled")
    wait_for(lambda: env.annotation("cli") == "enabled", 10, "annotation on cli")
    assert env.annotation("be1") == "enabled"
    # xDS delivered the service: connections to the VIP reach both backends.
    wait_for(lambda: env.connect("cli", f"{env.vip}:80")["ok"] == 1, 30, "VIP translated")
    r = env.connect("cli", f"{env.vip}:80", n=30)
    assert r["ok"] == 30 and set(r["replies"]) == {"be1", "be2"}, r


def test_none_label_pod_left_alone(env: Env) -> None:
    assert "optout" not in env.enrolled()
    assert env.annotation("optout") is None
    r = env.connect("optout", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
    assert env.connect("optout", "10.66.0.3:8080")["ok"] == 1  # plain traffic still works


def test_unenrolling_reverts_both(env: Env) -> None:
    env.label_namespace(None)
    wait_for(lambda: "cli" not in env.enrolled(), 30, "cli unenrolled")
    wait_for(lambda: env.annotation("cli") is None, 10, "annotation removed")
    r = env.connect("cli", f"{env.vip}:80", timeout=1)
    assert r["ok"] == 0, r
    env.label_namespace("kmesh")  # lower case works too; later tests need it enrolled
    wait_for(lambda: {"cli", "be1", "be2"} <= env.enrolled(), 30, "pods re-enrolled")
    wait_for(lambda: env.connect("cli", f"{env.vip}:80")["ok"] == 1, 30, "VIP translated again")
