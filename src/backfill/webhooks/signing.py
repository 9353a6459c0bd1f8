"""Standard Webhooks signatures, the scheme OpenAI signs with and the `openai` SDK's
`client.webhooks.unwrap(body, headers, secret=...)` checks.

The `standardwebhooks` package (the specification's own reference library) computes the
signature: `v1,` and the base64 HMAC-SHA256, keyed with the secret's bytes, of
`{webhook-id}.{webhook-timestamp}.{body}`. Each attempt is signed at its own time, since
receivers refuse a timestamp more than five minutes away from their clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook


def signed_headers(
    secrets: Sequence[str], message_id: str, body: bytes, now: float
) -> dict[str, str]:
    """The headers of one attempt to deliver `body` (the exact bytes sent), with a signature
    per secret (two while a rotated-out secret is still kept), space-separated as the
    specification says."""
    at = datetime.fromtimestamp(int(now), UTC)
    text = body.decode()
    signatures = " ".join(Webhook(secret).sign(message_id, at, text) for secret in secrets)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }
