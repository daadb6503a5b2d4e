"""Bearer tokens per role, for every transport: who may ingest, who may only read.

An ingest token may also read. Tokens are compared in constant time against every configured
token (no early exit), so timing tells nothing about how much of a guess was right or which
list it was in. Messages never contain a token.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Sequence

from transaction_service.errors import PermissionDenied, Reason, Unauthenticated


class Role(enum.Enum):
    READ = "read"
    INGEST = "ingest"


class BearerTokens:
    """The configured tokens; `authorize` checks an `authorization` header value for a role."""

    def __init__(self, ingest_tokens: Sequence[str], read_tokens: Sequence[str]) -> None:
        self._ingest = [token.encode() for token in ingest_tokens]
        self._read = [token.encode() for token in read_tokens]

    @property
    def required(self) -> bool:
        """Tokens are configured, so every call must bring one."""
        return bool(self._ingest or self._read)

    def role_of(self, token: str) -> Role | None:
        presented = token.encode()
        is_ingest = is_read = False
        for known in self._ingest:
            is_ingest |= hmac.compare_digest(presented, known)
        for known in self._read:
            is_read |= hmac.compare_digest(presented, known)
        if is_ingest:
            return Role.INGEST
        return Role.READ if is_read else None

    def authorize(self, authorization: str | None, needed: Role) -> None:
        """Return if the header's token may act as `needed` (or no tokens are configured);
        raise Unauthenticated or PermissionDenied otherwise."""
        if not self.required:
            return
        token = bearer_token(authorization)
        if token is None:
            raise Unauthenticated(
                "this service requires a token: send the header 'authorization: Bearer <token>'",
                reason=Reason.MISSING_TOKEN,
            )
        role = self.role_of(token)
        if role is None:
            raise Unauthenticated("the bearer token is not valid here", reason=Reason.UNKNOWN_TOKEN)
        if needed is Role.INGEST and role is not Role.INGEST:
            raise PermissionDenied("this token may only read; ingesting needs an ingest token")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value; None if there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
