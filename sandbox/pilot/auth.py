"""istiod's xDS authentication: Kubernetes JWT via TokenReview, cluster id, identity check.

Mirrors security/pkg/server/ca/authenticate/kubeauth (token + cluster) and pilot/pkg/xds/auth.go
(node NAMESPACE / SERVICE_ACCOUNT must match the token): failures of the first kind are
UNAUTHENTICATED, of the second PERMISSION_DENIED.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandbox.pilot.server import Authenticator, AuthError

log = logging.getLogger("sandbox.pilot.auth")
AUDIENCE = "istio-ca"
SA_PREFIX = "system:serviceaccount:"


@dataclass
class Identity:
    namespace: str
    service_account: str


class KubeJwtAuthenticator(Authenticator):
    def __init__(self, api_client: Any, cluster_id: str, audiences: tuple[str, ...] = (AUDIENCE,)) -> None:
        self.api_client = api_client
        self.cluster_id = cluster_id
        self.audiences = audiences

    def authenticate(self, metadata: Mapping[str, str]) -> Identity:
        claimed = metadata.get("clusterid", "")
        if claimed and claimed != self.cluster_id:
            raise AuthError("UNAUTHENTICATED", f"authentication failure: client claims to be in cluster "
                            f"{claimed!r}, but we only know about local cluster {self.cluster_id!r}")
        header = metadata.get("authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            raise AuthError("UNAUTHENTICATED", "authentication failure: no bearer token")
        return self._review(header[7:].strip())

    def _review(self, token: str) -> Identity:
        from kubernetes import client

        api = client.AuthenticationV1Api(self.api_client)
        spec = client.V1TokenReviewSpec(token=token, audiences=list(self.audiences))
        body = client.V1TokenReview(spec=spec)
        try:
            review = api.create_token_review(body)
        except Exception as e:  # noqa: BLE001 - API down or rejected: the token is not proven
            log.warning("TokenReview failed: %s", e)
            raise AuthError("UNAUTHENTICATED", "authentication failure: token review failed") from None
        st = review.status
        if st is None or not st.authenticated:
            why = (st.error if st is not None else "") or "token not authenticated"
            raise AuthError("UNAUTHENTICATED", f"authentication failure: {why}")
        if st.audiences is not None and not set(st.audiences) & set(self.audiences):
            raise AuthError("UNAUTHENTICATED", "authentication failure: token audience is not istio-ca")
        username = st.user.username if st.user is not None else ""
        if not username.startswith(SA_PREFIX) or username.count(":") != 3:
            raise AuthError("UNAUTHENTICATED", f"authentication failure: {username!r} is no service account")
        ns, sa = username[len(SA_PREFIX):].split(":", 1)
        return Identity(namespace=ns, service_account=sa)

    def authorize(self, identity: Any, node: Any) -> None:
        if not isinstance(identity, Identity):
            return
        fields = dict(node.metadata.fields)
        ns = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
        sa = fields["SERVICE_ACCOUNT"].string_value if "SERVICE_ACCOUNT" in fields else ""
        if ns != identity.namespace:
            raise AuthError("PERMISSION_DENIED", f"authorization failed: node namespace {ns!r} is not "
                            f"the token's namespace {identity.namespace!r}")
        if sa and sa != identity.service_account:
            raise AuthError("PERMISSION_DENIED", f"authorization failed: node service account {sa!r} is "
                            f"not the token's {identity.service_account!r}")
