"""Svix (Standard Webhooks) signatures: which headers, which secrets, what counts as valid.

The HMAC itself is the `standardwebhooks` library's; this module picks the headers (`svix-*` or
`webhook-*`), tries every configured secret (several during a rotation), and says precisely why a
request was refused without ever saying anything about a secret.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from standardwebhooks import Webhook, WebhookVerificationError

from transaction_service.errors import Reason, Unauthenticated

# Svix's tolerance, and the one `standardwebhooks` applies; checked here too, to name the reason.
TOLERANCE_SECONDS = 5 * 60
HEADER_PREFIXES = ("svix-", "webhook-")


@dataclass(frozen=True)
class SignatureHeaders:
    """The three headers of a signed delivery, whichever prefix they came with."""

    id: str
    timestamp: str
    signature: str

    def as_standard(self) -> dict[str, str]:
        return {
            "webhook-id": self.id,
            "webhook-timestamp": self.timestamp,
            "webhook-signature": self.signature,
        }


def signature_headers(headers: Mapping[str, str]) -> SignatureHeaders | None:
    """The first complete set of `svix-*` or `webhook-*` headers; None if neither is complete.
    `headers` must look names up case-insensitively (as aiohttp's do)."""
    for prefix in HEADER_PREFIXES:
        values = [headers.get(prefix + name, "") for name in ("id", "timestamp", "signature")]
        if all(values):
            return SignatureHeaders(*values)
    return None


def event_id_header(headers: Mapping[str, str]) -> str:
    """The delivery's id from `svix-id` or `webhook-id`, signed or not; empty if absent."""
    return headers.get("svix-id") or headers.get("webhook-id") or ""


class WebhookVerifier:
    """Checks signatures against every configured secret; any one of them may match."""

    def __init__(self, secrets: Sequence[str], clock: Callable[[], float] = time.time) -> None:
        if not secrets:
            raise ValueError("at least one secret is needed")
        self._hooks = [Webhook(secret) for secret in secrets]
        self._clock = clock

    @property
    def secret_count(self) -> int:
        return len(self._hooks)

    def check_headers(self, headers: Mapping[str, str]) -> SignatureHeaders:
        """The signature headers, present and timely; raises Unauthenticated. Cheap: done before
        the body is read."""
        signed = signature_headers(headers)
        if signed is None:
            raise Unauthenticated(
                "missing signature headers: svix-id, svix-timestamp and svix-signature "
                "(or webhook-id, webhook-timestamp and webhook-signature)",
                reason=Reason.MISSING_SIGNATURE,
            )
        try:
            sent_at = float(signed.timestamp)
        except ValueError:
            sent_at = math.nan
        if not math.isfinite(sent_at):
            raise Unauthenticated(
                "the signature timestamp is not a number of seconds", reason=Reason.BAD_TIMESTAMP
            )
        if abs(self._clock() - sent_at) > TOLERANCE_SECONDS:
            raise Unauthenticated(
                "the signature timestamp is more than 5 minutes away from this server's clock",
                reason=Reason.TIMESTAMP_OUT_OF_TOLERANCE,
            )
        return signed

    def verify(self, signed: SignatureHeaders, body: str) -> None:
        """Return if one secret signed `body` under these headers; raise Unauthenticated if none
        did. `body` is the raw body decoded as UTF-8 (the library signs text)."""
        headers = signed.as_standard()
        for hook in self._hooks:
            try:
                hook.verify(body, headers, json_parse=False)
                return
            # ValueError: an entry that is not "v1,<base64>" (the library does not catch it).
            except (WebhookVerificationError, ValueError):
                continue
        raise Unauthenticated(
            "no valid signature for this body with the configured secret(s)",
            reason=Reason.BAD_SIGNATURE,
        )
