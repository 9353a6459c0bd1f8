"""Bearer-key authentication: `Authorization: Bearer <key>` -> the key's project.

Keys are never stored: the store knows their SHA-256 hex digests (`store.project_for_key`).
A small in-process cache (digest -> project, a few seconds) keeps the hot path off the
database: the openai SDK polls `GET /v1/batches/{id}` in loops. Only hits are cached, so a key
added a moment ago works at once; a removed key keeps working for at most `ttl` seconds.
The cached digest is re-checked with `hmac.compare_digest` so the comparison of secrets-derived
values is constant-time even though the dict lookup is not.

`/health` and unknown routes need no key; every `/v1` route depends on `Authenticator.require`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from backfill.api.responses import call
from backfill.domain.records import Project
from backfill.errors import AuthenticationFailed
from backfill.store.base import Store


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _redact(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}" if len(key) > 10 else "***"


@dataclass(slots=True)
class _Entry:
    digest: str
    project: Project
    expires: float


class Authenticator:
    def __init__(
        self,
        store: Store,
        *,
        ttl: float = 10.0,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[str, _Entry] = {}

    async def project_for(self, authorization: str | None) -> Project:
        key = self._bearer_key(authorization)
        digest = key_digest(key)
        now = self._clock()
        entry = self._cache.get(digest)
        if entry is not None and entry.expires > now and hmac.compare_digest(entry.digest, digest):
            return entry.project
        project = await call(self._store.project_for_key, digest)
        if project is None:
            self._cache.pop(digest, None)
            raise AuthenticationFailed(
                f"Incorrect API key provided: {_redact(key)}.", code="invalid_api_key"
            )
        if len(self._cache) >= self._max_entries:
            self._evict(now)
        self._cache[digest] = _Entry(digest, project, now + self._ttl)
        return project

    async def require(self, request: Request) -> Project:
        """FastAPI dependency: the calling project, or 401."""
        return await self.project_for(request.headers.get("authorization"))

    def _evict(self, now: float) -> None:
        for digest in [d for d, e in self._cache.items() if e.expires <= now]:
            del self._cache[digest]
        while len(self._cache) >= self._max_entries:
            del self._cache[next(iter(self._cache))]

    @staticmethod
    def _bearer_key(authorization: str | None) -> str:
        if not authorization or not authorization.strip():
            raise AuthenticationFailed(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed(
                "Malformed Authorization header: expected 'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
            )
        return key
