"""Authentication endpoints and request authentication: TokenRequest, TokenReview, bearer tokens.

A mixin of ``rest.Api`` (it uses the store, the token issuer and the admin token of the server).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from . import errors, kinds
from .model import Request, Response, Target, json_response
from .store import Store
from .tokens import API_AUDIENCE, TokenIssuer


class AuthnEndpoints:
    """TokenRequest (serviceaccounts/NAME/token), TokenReview, and who a bearer token is."""

    # Provided by rest.Api.
    store: Store
    issuer: TokenIssuer
    admin_token: str
    _require: Callable[[Target], dict[str, Any]]
    _decode: Callable[[Request], Any]

    def authenticate(self, token: str | None) -> str | None:
        """Username for a bearer token, or None (-> 401)."""
        if not token:
            return None
        if token == self.admin_token:
            return "sandbox-admin"
        claims = self.issuer.verify(token)
        if claims is None:
            return None
        aud = claims.get("aud") or []
        aud = [aud] if isinstance(aud, str) else aud
        if API_AUDIENCE not in aud or not self._sa_claims_live(claims):
            return None
        return str(claims["sub"])

    def _sa_claims_live(self, claims: dict[str, Any]) -> bool:
        k8s = claims.get("kubernetes.io") or {}
        sa = k8s.get("serviceaccount") or {}
        rt = kinds.by_kind("ServiceAccount")
        assert rt
        obj = self.store.get(rt, k8s.get("namespace", ""), sa.get("name", ""))
        if obj is None or obj["metadata"].get("uid") != sa.get("uid"):
            return False
        pod = k8s.get("pod")
        if pod:
            prt = kinds.by_kind("Pod")
            assert prt
            p = self.store.get(prt, k8s.get("namespace", ""), pod.get("name", ""))
            if p is None or p["metadata"].get("uid") != pod.get("uid"):
                return False
        return True

    def _token_request(self, req: Request, t: Target) -> Response:
        body = self._decode(req)
        if not isinstance(body, dict):
            raise errors.bad_request("invalid TokenRequest")
        sa = self._require(t)
        spec = body.get("spec") or {}
        audiences = spec.get("audiences") or [API_AUDIENCE]
        expiration = int(spec.get("expirationSeconds") or 3600)
        tr_rt = kinds.ResourceType("authentication.k8s.io", ("v1",), "TokenRequest", "tokenrequests", True)
        if expiration < 600:
            raise errors.invalid(
                tr_rt,
                t.name or "",
                [
                    (
                        "spec.expirationSeconds",
                        "FieldValueInvalid",
                        "Invalid value: may not specify a duration less than 10 minutes",
                    )
                ],
            )
        bound = spec.get("boundObjectRef")
        if bound:
            brt = kinds.by_kind(bound.get("kind", ""))
            target = self.store.get(brt, t.namespace or "", bound.get("name", "")) if brt else None
            if target is None or (bound.get("uid") and bound["uid"] != target["metadata"]["uid"]):
                raise errors.not_found(brt or tr_rt, bound.get("name", ""))
            bound = {"kind": bound.get("kind"), "name": bound.get("name"), "uid": target["metadata"]["uid"]}
        token, exp = self.issuer.issue(
            t.namespace or "", t.name or "", sa["metadata"]["uid"], audiences, expiration, bound
        )
        exp_ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
        out = {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": t.name, "namespace": t.namespace, "creationTimestamp": None},
            "spec": {
                "audiences": audiences,
                "expirationSeconds": expiration,
                "boundObjectRef": spec.get("boundObjectRef"),
            },
            "status": {"token": token, "expirationTimestamp": exp_ts},
        }
        return json_response(201, out)

    def _token_review(self, req: Request) -> Response:
        body = self._decode(req)
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            raise errors.bad_request("invalid TokenReview")
        spec = body["spec"]
        token = spec.get("token") or ""
        wanted = spec.get("audiences") or [API_AUDIENCE]
        status: dict[str, Any] = {"user": {}}
        if token == self.admin_token:
            status.update(
                authenticated=True,
                audiences=wanted,
                user={"username": "sandbox-admin", "groups": ["system:masters", "system:authenticated"]},
            )
        else:
            claims = self.issuer.verify(token)
            aud = (claims or {}).get("aud") or []
            aud = [aud] if isinstance(aud, str) else aud
            matched = [a for a in wanted if a in aud]
            if claims is None:
                status.update(authenticated=False, error="invalid bearer token, token could not be validated")
            elif not matched:
                status.update(
                    authenticated=False,
                    error="invalid bearer token, token audiences "
                    f"{json.dumps(aud)} is invalid for the target audiences {json.dumps(wanted)}",
                )
            elif not self._sa_claims_live(claims):
                status.update(
                    authenticated=False,
                    error="invalid bearer token, service account or bound object no longer exists",
                )
            else:
                k8s = claims.get("kubernetes.io") or {}
                extra: dict[str, list[str]] = {}
                if k8s.get("pod"):
                    extra["authentication.kubernetes.io/pod-name"] = [k8s["pod"]["name"]]
                    extra["authentication.kubernetes.io/pod-uid"] = [k8s["pod"]["uid"]]
                status.update(
                    authenticated=True,
                    audiences=matched,
                    user={
                        "username": claims["sub"],
                        "uid": (k8s.get("serviceaccount") or {}).get("uid", ""),
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{k8s.get('namespace', '')}",
                            "system:authenticated",
                        ],
                        **({"extra": extra} if extra else {}),
                    },
                )
        out = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return json_response(201, out)
