"""`GET /health` (liveness) and `GET /health/ready` (readiness: can we write?).

`/health` answers as long as the process serves HTTP; it touches nothing, so an orchestrator
does not restart a healthy process because its database is slow.

`/health/ready` says whether requests that write can succeed: it writes and deletes a tiny
record in each backend and answers 503 (the error envelope, plus `status` and `checks`) if
either fails, so a load balancer can take this process out of rotation while its database or
object store is down or read-only. The probes use what the interfaces already have: the store's
named claims (`claim` writes a row, `release_claim` deletes it; the name is this process's own)
and a small object under `health/` in the blob store.

A probe cannot hang the check: each is bounded by `ready_timeout_seconds`. The store is
synchronous, so its probe runs in a worker thread we stop waiting for on timeout but cannot
kill; the probe has its own limiter of one thread, so while a probe is stuck no second one
starts (the check reports `timeout`) and a hung database cannot eat the threads the API's
store calls need. The
result is cached for a second and concurrent callers share one probe, so polling the endpoint
hard cannot load the database either. Failures are logged; the answer says only which backend
failed (backend messages can carry URLs and paths).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import anyio
import anyio.to_thread
from starlette.responses import Response

from backfill.api.responses import JsonResponse
from backfill.blobs.base import Blobs
from backfill.domain import paths
from backfill.errors import error_body
from backfill.store.base import Store

log = logging.getLogger("backfill.api")

CACHE_SECONDS = 1.0
OK = "ok"


class Readiness:
    def __init__(
        self,
        store: Store,
        blobs: Blobs,
        *,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._timeout = timeout
        self._clock = clock
        token = uuid.uuid4().hex
        self._claim = f"health:{token}"
        self._blob_path = paths.probe_path(token)
        #: one probe thread at a time: a probe stuck in the database blocks the next one
        self._one_thread: anyio.CapacityLimiter | None = None
        self._lock = anyio.Lock()
        self._checked_at = -CACHE_SECONDS
        self._checks: dict[str, str] = {}

    async def checks(self) -> dict[str, str]:
        """`{"store": "ok" | "error" | "timeout", "blobs": ...}`, at most a second old."""
        if self._clock() - self._checked_at < CACHE_SECONDS:
            return self._checks
        async with self._lock:
            if self._clock() - self._checked_at >= CACHE_SECONDS:
                self._checks = {
                    "store": await self._probe_store(),
                    "blobs": await self._probe_blobs(),
                }
                self._checked_at = self._clock()
            return self._checks

    async def response(self) -> Response:
        checks = await self.checks()
        failed = [name for name, state in checks.items() if state != OK]
        if not failed:
            return JsonResponse({"status": "ok", "checks": checks})
        body = error_body(
            f"Not ready: cannot write to the {' and the '.join(failed)}.",
            "server_error",
            None,
            "not_ready",
        )
        body.update(status="unavailable", checks=checks)
        return JsonResponse(body, status_code=503, headers={"retry-after": "1"})

    async def _probe_store(self) -> str:
        if self._one_thread is None:
            self._one_thread = anyio.CapacityLimiter(1)

        def probe() -> None:
            self._store.claim(self._claim, self._claim, time.time(), 60.0)
            self._store.release_claim(self._claim, self._claim)

        try:
            with anyio.fail_after(self._timeout):
                await anyio.to_thread.run_sync(
                    probe, abandon_on_cancel=True, limiter=self._one_thread
                )
        except TimeoutError:
            log.warning("readiness: the store probe took over %gs", self._timeout)
            return "timeout"
        except Exception:
            log.exception("readiness: the store cannot be written")
            return "error"
        return OK

    async def _probe_blobs(self) -> str:
        try:
            with anyio.fail_after(self._timeout):
                await self._blobs.put(self._blob_path, b"ok")
                await self._blobs.delete(self._blob_path)
        except TimeoutError:
            log.warning("readiness: the blob probe took over %gs", self._timeout)
            return "timeout"
        except Exception:
            log.exception("readiness: the blob store cannot be written")
            return "error"
        return OK
