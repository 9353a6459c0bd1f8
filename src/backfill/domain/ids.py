"""Identifiers in the shapes the OpenAI API uses (`file-...`, `batch_...`, `batch_req_...`).

Random, URL-safe and unguessable, so an id reveals nothing about other projects. Ordering is
never derived from ids: the store keeps a monotonic sequence number for list cursors.
"""

from __future__ import annotations

import secrets
import string

_ALPHABET = string.ascii_letters + string.digits


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_file_id() -> str:
    return "file-" + _random(24)


def new_batch_id() -> str:
    return "batch_" + _random(24)


def new_request_id() -> str:
    """Id of one output/error line (`batch_req_...`)."""
    return "batch_req_" + secrets.token_hex(12)


def new_project_id() -> str:
    return "proj_" + _random(16)


def new_api_key() -> str:
    return "sk-bf-" + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """The public name of an API key (`key_...`): shown and revoked by, never a secret."""
    return "key_" + _random(16)


def new_token() -> str:
    """A lease token or worker id: opaque and unique."""
    return secrets.token_hex(16)
