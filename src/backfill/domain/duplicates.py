"""Which requests may share one answer, and the key that says two requests are the same.

A batch often holds the same request more than once (retries of a pipeline, the same question
about the same document). When the answer cannot differ, one call serves them all: the
dispatcher (`dispatch/dedup.py`) sends it once and gives each line the answer under its own
`custom_id`. When the answer can differ (sampling), sending once would change what the user
asked for, so by default only deterministic requests share:

- `"deterministic"` (the default of `ModelConfig.dedup`): embeddings and moderations (no
  sampling), and generation with `temperature` 0 or a fixed `seed`;
- `"all"`: any body (the operator accepts one sample for all copies);
- `"off"`: every line is sent.

The key is a digest of the endpoint and the body as it will be sent (written back with every
number exactly as it was read), so only byte-for-byte equal requests share, never two that
differ in a parameter.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from backfill.domain import exact_json

DedupMode = Literal["deterministic", "all", "off"]
DEDUP_MODES: tuple[str, ...] = ("deterministic", "all", "off")

_NO_SAMPLING = ("/embeddings", "/moderations")


def deterministic(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether every call with this body gets the same answer (as far as the API promises)."""
    if endpoint.endswith(_NO_SAMPLING):
        return True
    temperature = body.get("temperature")
    number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
    if number and temperature == 0:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def may_share(mode: str, endpoint: str, body: dict[str, Any]) -> bool:
    """Whether this request may share its call with identical ones under `mode`."""
    if mode == "off":
        return False
    if mode == "all":
        return True
    return deterministic(endpoint, body)


def body_key(endpoint: str, body: dict[str, Any]) -> bytes:
    """16 bytes naming the request: equal exactly when endpoint and body are equal."""
    digest = hashlib.blake2b(endpoint.encode(), digest_size=16)
    digest.update(b"\x00")
    digest.update(exact_json.dumps(body))
    return digest.digest()
