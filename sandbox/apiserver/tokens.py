"""ServiceAccount tokens: issue (TokenRequest) and verify (TokenReview, request authentication).

Tokens are RS256 JWTs signed by a key the server keeps in its state dir (``sa.key``, created on
first start) or in memory. Claims follow the real API server's bound tokens: iss, sub
``system:serviceaccount:NS:NAME``, aud, exp/iat/nbf and the ``kubernetes.io`` claim with
namespace, serviceaccount {name, uid} and an optional bound pod.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Any

ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCE = ISSUER


class TokenIssuer:
    def __init__(self, state_dir: Path | None = None, issuer: str = ISSUER) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.issuer = issuer
        key_path = state_dir / "sa.key" if state_dir else None
        if key_path is not None and key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        else:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if key_path is not None:
                key_path.parent.mkdir(parents=True, exist_ok=True)
                key_path.write_bytes(
                    self._key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                )
                key_path.chmod(0o600)
        self._public = self._key.public_key()
        der = self._public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.key_id = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()

    def issue(
        self,
        namespace: str,
        name: str,
        sa_uid: str,
        audiences: list[str],
        expiration_seconds: int,
        bound: dict[str, Any] | None = None,
    ) -> tuple[str, int]:
        """A signed token and its expiry (unix seconds)."""
        import jwt

        now = int(time.time())
        exp = now + expiration_seconds
        k8s: dict[str, Any] = {"namespace": namespace, "serviceaccount": {"name": name, "uid": sa_uid}}
        if bound and bound.get("kind") in ("Pod", "Secret", "Node"):
            k8s[bound["kind"].lower()] = {"name": bound.get("name", ""), "uid": bound.get("uid", "")}
        claims = {
            "iss": self.issuer,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "aud": audiences,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "kubernetes.io": k8s,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.key_id})
        return token, exp

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of a valid, unexpired token signed by us; None otherwise."""
        import jwt

        try:
            return jwt.decode(
                token,
                self._public,
                algorithms=["RS256"],
                issuer=self.issuer,
                options={"verify_aud": False, "require": ["exp", "sub", "iss"]},
            )
        except jwt.PyJWTError:
            return None

    def jwks(self) -> dict[str, Any]:
        nums = self._public.public_numbers()

        def b64(n: int) -> str:
            return (
                base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()
            )

        return {
            "keys": [
                {
                    "use": "sig",
                    "kty": "RSA",
                    "kid": self.key_id,
                    "alg": "RS256",
                    "n": b64(nums.n),
                    "e": b64(nums.e),
                }
            ]
        }
