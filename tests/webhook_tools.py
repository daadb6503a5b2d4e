"""HTTP test helpers: sign a delivery as Svix does, send real HTTP requests, read metrics."""

from __future__ import annotations

import base64
import http.client
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

WEBHOOK_PATH = "/webhooks/junction"
HTTP_TIMEOUT = 60.0


def make_secret(seed: str) -> str:
    """A `whsec_` secret, different for every seed."""
    return "whsec_" + base64.b64encode(seed.encode().ljust(24, b"-")).decode()


SECRET = make_secret("the current secret")
OLD_SECRET = make_secret("the secret before rotation")


def signature(secret: str, event_id: str, body: bytes, at: float) -> str:
    """`v1,<base64>`, what Svix puts in svix-signature for this id, time and body."""
    sent_at = datetime.fromtimestamp(int(at), UTC)
    return Webhook(secret).sign(event_id, sent_at, body.decode())


def signed_headers(
    secret: str,
    event_id: str,
    body: bytes,
    *,
    at: float | None = None,
    prefix: str = "svix-",
) -> dict[str, str]:
    at = time.time() if at is None else at
    return {
        f"{prefix}id": event_id,
        f"{prefix}timestamp": str(int(at)),
        f"{prefix}signature": signature(secret, event_id, body, at),
        "content-type": "application/json",
    }


def body_of(delivery: dict[str, Any]) -> bytes:
    return json.dumps(delivery["body"]).encode()


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One real HTTP request to localhost:`port`. An iterable body is sent chunked."""
    conn = http.client.HTTPConnection("localhost", port, timeout=HTTP_TIMEOUT)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return Reply(response.status, response.read(), dict(response.getheaders()))
    finally:
        conn.close()


def post_webhook(port: int, body: bytes | Iterable[bytes], headers: dict[str, str]) -> Reply:
    return request(port, "POST", WEBHOOK_PATH, body, headers)


def send_signed(port: int, delivery: dict[str, Any], secret: str = SECRET) -> Reply:
    body = body_of(delivery)
    return post_webhook(port, body, signed_headers(secret, delivery["svix_id"], body))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus text output; 0 if absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(
        rf"^{re.escape(name)}(?:\{{(?P<labels>[^}}]*)\}})? (?P<value>\S+)$", re.MULTILINE
    )
    for match in pattern.finditer(text):
        found = ",".join(sorted((match.group("labels") or "").split(","))) if labels else ""
        if found == wanted or (not labels and not match.group("labels")):
            return float(match.group("value"))
    return 0.0
