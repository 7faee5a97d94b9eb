"""ServiceAccount TokenRequest and TokenReview, used the way istiod / the sandbox pilot use them."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import jwt
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from .conftest import Cluster


def _token(
    core: client.CoreV1Api,
    ns: str,
    sa: str,
    audiences: list[str] | None = None,
    seconds: int = 3600,
    bound: dict[str, Any] | None = None,
) -> str:
    spec: dict[str, Any] = {"expirationSeconds": seconds}
    if audiences is not None:
        spec["audiences"] = audiences
    if bound is not None:
        spec["boundObjectRef"] = bound
    resp = core.create_namespaced_service_account_token(sa, ns, {"spec": spec})
    assert resp.status.expiration_timestamp is not None
    return resp.status.token


def _review(auth: client.AuthenticationV1Api, token: str, audiences: list[str] | None = None) -> Any:
    spec: dict[str, Any] = {"token": token}
    if audiences is not None:
        spec["audiences"] = audiences
    return auth.create_token_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
    ).status


def test_token_request_claims(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    sa = core.create_namespaced_service_account(ns, {"metadata": {"name": "kmesh"}})
    token = _token(core, ns, "kmesh", ["istio-ca"], 43200)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == f"system:serviceaccount:{ns}:kmesh"
    assert claims["aud"] == ["istio-ca"]
    assert claims["iss"] == "https://kubernetes.default.svc.cluster.local"
    assert 43190 <= claims["exp"] - claims["iat"] <= 43200
    assert claims["kubernetes.io"]["namespace"] == ns
    assert claims["kubernetes.io"]["serviceaccount"] == {"name": "kmesh", "uid": sa.metadata.uid}
    # The signature verifies with the published JWKS.
    with urllib.request.urlopen(f"{cluster.server.url}/openid/v1/jwks", timeout=5) as resp:
        jwks = json.load(resp)
    key = jwt.PyJWK(jwks["keys"][0]).key
    jwt.decode(token, key, algorithms=["RS256"], audience="istio-ca")


def test_token_review(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    core, auth = client.CoreV1Api(api), client.AuthenticationV1Api(api)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "kmesh"}})
    token = _token(core, ns, "kmesh", ["istio-ca"])

    ok = _review(auth, token, ["istio-ca"])
    assert ok.authenticated is True
    assert ok.user.username == f"system:serviceaccount:{ns}:kmesh"
    assert ok.audiences == ["istio-ca"]
    assert f"system:serviceaccounts:{ns}" in ok.user.groups

    wrong_aud = _review(auth, token, ["other"])
    assert not wrong_aud.authenticated and "audiences" in wrong_aud.error
    tampered = _review(auth, token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), ["istio-ca"])
    assert not tampered.authenticated
    assert not _review(auth, "garbage", ["istio-ca"]).authenticated

    # Deleting the ServiceAccount invalidates its tokens.
    core.delete_namespaced_service_account("kmesh", ns)
    assert not _review(auth, token, ["istio-ca"]).authenticated


def test_pod_bound_token(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    api = cluster.api_client()
    core, auth = client.CoreV1Api(api), client.AuthenticationV1Api(api)
    pod = core.create_namespaced_pod(
        ns, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}
    )
    token = _token(
        core,
        ns,
        "default",
        ["istio-ca"],
        bound={"kind": "Pod", "apiVersion": "v1", "name": "p", "uid": pod.metadata.uid},
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["kubernetes.io"]["pod"] == {"name": "p", "uid": pod.metadata.uid}
    assert _review(auth, token, ["istio-ca"]).authenticated
    core.delete_namespaced_pod("p", ns)
    assert not _review(auth, token, ["istio-ca"]).authenticated


def test_token_request_errors(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    with pytest.raises(ApiException) as e:
        _token(core, ns, "missing", ["istio-ca"])
    assert (
        e.value.status == 404 and json.loads(e.value.body)["message"] == 'serviceaccounts "missing" not found'
    )
    with pytest.raises(ApiException) as e:
        _token(core, ns, "default", ["istio-ca"], seconds=60)
    assert e.value.status == 422


def test_issued_api_token_authenticates_requests(cluster: Cluster) -> None:
    ns = cluster.new_namespace()
    core = client.CoreV1Api(cluster.api_client())
    api_token = _token(core, ns, "default")  # default audience: the API server itself
    as_sa = client.CoreV1Api(cluster.api_client(token=api_token))
    assert as_sa.read_namespace(ns).metadata.name == ns
    # A token for another audience is not accepted by the API server.
    istio_token = _token(core, ns, "default", ["istio-ca"])
    with pytest.raises(ApiException) as e:
        client.CoreV1Api(cluster.api_client(token=istio_token)).read_namespace(ns)
    assert e.value.status == 401
