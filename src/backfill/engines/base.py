"""The one small interface every engine implements.

An engine knows nothing of batches, shards or storage: it gets the endpoint path
(`/v1/chat/completions`) and the JSON body of one request, and answers with the HTTP status
and the raw JSON body it produced. Transport failures (refused connection, timeout, reset) raise
`EngineUnavailable`; the dispatcher decides about retries. Engines rename the model if the
operator mapped a public name to a different upstream name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class EngineReply:
    status: int
    body: bytes
    retry_after: float | None = None
    request_id: str | None = None


class Engine(Protocol):
    #: public model name this engine serves
    model: str
    #: endpoints it can serve, e.g. {"/v1/chat/completions", "/v1/completions"}
    endpoints: frozenset[str]

    async def start(self) -> None:
        """Open pools, load weights. Called once, on the loop that will call `send`."""

    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (a per-request budget)
    ) -> EngineReply:
        """Run one request. Raises `EngineUnavailable` on transport failure or timeout."""

    async def close(self) -> None: ...
