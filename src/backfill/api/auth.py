"""Bearer-key authentication: `Authorization: Bearer <key>` -> the key's project.

Keys are never stored: the store knows their SHA-256 hex digests (`store.project_for_key`).
A small in-process cache (digest -> project, a few seconds) keeps the hot path off the
database: the openai SDK polls `GET /v1/batches/{id}` in loops. Only hits are cached, so a key
added a moment ago works at once; a removed key keeps working for at most `ttl` seconds.
The cached digest is re-checked with `hmac.compare_digest` so the comparison of secrets-derived
values is constant-time even though the dict lookup is not.

`/health` and unknown routes need no key; every `/v1` route depends on `Authenticator.require`.

Guessing keys is slowed per client address (`FailedAuthLimiter`): after `auth_failure_limit`
wrong keys within `auth_failure_window_seconds` from one address, that address gets 429
`rate_limit_error` with `retry-after` until the window ends, decided before the store is asked,
so a guesser cannot load the database. Successes are not slowed: a key that has authenticated
before (the last `max_known` distinct keys are remembered by digest) skips the limiter, so one
misconfigured client behind a shared address does not lock out its neighbours; only a key never
seen to work is refused there. A missing or malformed header is a 401 that costs nothing and
probes nothing, so it is not counted. IPv6 addresses are counted by /64, the block one host
usually holds. The address is the connection's, or the `X-Forwarded-For` of a proxy uvicorn
trusts (`FORWARDED_ALLOW_IPS`, by default only 127.0.0.1). The map of addresses is an LRU of
bounded size: a flood of addresses forgets the oldest, it cannot grow memory.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from backfill.api.responses import call
from backfill.domain.records import Project
from backfill.errors import AuthenticationFailed, RateLimited
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


def address_of(host: str | None) -> str | None:
    """The unit failures are counted by: the address, or its /64 for IPv6."""
    if not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class FailedAuthLimiter:
    """At most `limit` failed keys per address in a fixed window that starts at its first one.

    A lookup in flight counts as a failure until it succeeds (`begin` / `succeeded`), so many
    concurrent guesses from one address cannot all reach the store before the first fails."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self._max_addresses = max_addresses
        self._clock = clock
        #: address -> [window start, failures (and lookups in flight)]
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def begin(self, address: str | None) -> None:
        """Count one lookup for `address`, or raise `RateLimited` if its failures are used up."""
        if address is None or self.limit <= 0:
            return
        now = self._clock()
        entry = self._failures.get(address)
        if entry is None or entry[0] + self.window <= now:
            entry = self._failures[address] = [now, 0.0]
        elif entry[1] >= self.limit:
            wait = entry[0] + self.window - now
            raise RateLimited(
                "Too many requests with an incorrect API key from your address. Please try "
                f"again in {math.ceil(wait)}s.",
                retry_after=wait,
            )
        self._failures.move_to_end(address)
        entry[1] += 1
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str | None) -> None:
        """The lookup `begin` counted found its key: it was no failure."""
        if address is None:
            return
        entry = self._failures.get(address)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._failures[address]


class Authenticator:
    def __init__(
        self,
        store: Store,
        *,
        ttl: float = 10.0,
        max_entries: int = 1024,
        failure_limit: int = 0,
        failure_window: float = 60.0,
        max_known: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self.failures = FailedAuthLimiter(failure_limit, failure_window, clock=clock)
        #: digests of keys that have authenticated (LRU): they skip the failure limiter
        self._known: OrderedDict[str, None] = OrderedDict()
        self._max_known = max_known

    async def project_for(self, authorization: str | None, client: str | None = None) -> Project:
        """The project of the key in `authorization`; `client` is the caller's address."""
        key = self._bearer_key(authorization)
        digest = key_digest(key)
        now = self._clock()
        entry = self._cache.get(digest)
        if entry is not None and entry.expires > now and hmac.compare_digest(entry.digest, digest):
            return entry.project
        address = None if digest in self._known else address_of(client)
        self.failures.begin(address)
        try:
            project = await call(self._store.project_for_key, digest)
        except BaseException:
            self.failures.succeeded(address)  # the store failed, not the key
            raise
        if project is None:
            self._cache.pop(digest, None)
            self._known.pop(digest, None)
            raise AuthenticationFailed(
                f"Incorrect API key provided: {_redact(key)}.", code="invalid_api_key"
            )
        self.failures.succeeded(address)
        self._known[digest] = None
        self._known.move_to_end(digest)
        while len(self._known) > self._max_known:
            self._known.popitem(last=False)
        if len(self._cache) >= self._max_entries:
            self._evict(now)
        self._cache[digest] = _Entry(digest, project, now + self._ttl)
        return project

    async def require(self, request: Request) -> Project:
        """FastAPI dependency: the calling project, or 401 (429 after repeated wrong keys)."""
        client = request.client
        return await self.project_for(
            request.headers.get("authorization"), client.host if client else None
        )

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
