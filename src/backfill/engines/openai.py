"""`OpenAIEngine`: any OpenAI-compatible HTTP upstream (vLLM, SGLang, llama.cpp, TGI, ...).

This is the hot path of a batch: every request of every shard goes through `send`, so it does
as little as possible per call:
- one `aiohttp.ClientSession` per engine, opened in `start()` on the worker's loop, with a
  keep-alive connector that sets no limit of its own: the dispatcher's window bounds batch
  requests, and real-time requests share this session, so a connector sized to the batch
  (`max_concurrency`) would make them queue for a socket behind the batch requests in flight
  (batch starving real time where the engine's latency figures cannot see it);
- fixed headers (content type, bearer token) live on the session; URLs are parsed once per
  endpoint and cached; the default timeout object is built once;
- bodies are serialized with orjson, every number exactly as the user wrote it
  (`domain/exact_json.py`), and the answer is returned as raw bytes (`resp.read()`),
  never parsed here: the worker writes them out as they are;
- no logging per request; failures are counted by the dispatcher.

URL rule: the configured `url` is the base the operator would give the `openai` SDK, usually
ending in `/v1`, while endpoints are full paths (`/v1/chat/completions`). If both carry the
`/v1`, it is used once: `http://h:8000/v1` + `/v1/chat/completions` ->
`http://h:8000/v1/chat/completions`; `http://h:8000` gives the same; `http://h/openai/v1` keeps
its prefix (`http://h/openai/v1/chat/completions`).

Errors are translated at this seam: anything that kept us from reading a complete HTTP answer
(refused, reset, DNS, invalid HTTP, truncated body) raises `EngineUnavailable` with code
`upstream_unavailable`; a timeout raises it with code `request_timeout`. HTTP error statuses
are not exceptions: they are answers, returned as they came, and the retry policy judges them.

Real time (`stream`): the gateway's path. The answer's bytes are yielded as aiohttp receives
them (`iter_any`, no line splitting, no buffering), so SSE events reach the client as the
upstream writes them. Leaving the context early closes the connection, which is how vLLM learns
that the client went away and aborts the request.

Load (`load_metrics`): `GET <root>/metrics` (the URL without its `/v1`), parsed from Prometheus
text by `backfill.metrics.parse`, and only its `LOAD_SAMPLES` are returned (vLLM's, SGLang's
and llama.cpp's names, every label folded: engines summed, KV-usage ratios averaged). The
governor scrapes every 100 ms, on the loop that also relays real-time streams, and
prometheus_client's parser needs ~18 ms for a whole vLLM page, ~0.5 ms for those samples
alone; so only the first page (and the first after a failed scrape) is parsed whole, which
refuses text that is not Prometheus', and later pages only their load samples (`parse_load`).
An upstream that answers anything else than 200, or such text, is remembered as having no
metrics and asked again only every `METRICS_RETRY_SECONDS`.

Health (`probe`): `GET <base>/v1/models`, which every OpenAI-compatible server answers; any
answer below 500 means the server is up. `engines/replicas.py` probes a drained replica with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from yarl import URL

from backfill import metrics
from backfill.domain import exact_json
from backfill.domain.retry import parse_retry_after
from backfill.engines.base import EngineReply, StreamReply
from backfill.errors import EngineUnavailable, InvalidRequest
from backfill.settings import ModelConfig

#: seconds an idle upstream connection is kept for reuse
KEEPALIVE_SECONDS = 30.0
#: seconds a DNS answer is reused
DNS_CACHE_SECONDS = 300
#: seconds before asking again an upstream that served no metrics
METRICS_RETRY_SECONDS = 30.0
#: budget of one metrics scrape
METRICS_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
#: budget of one health probe
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
#: the samples `load_metrics` returns (by name prefix): the load figures the governor reads
#: (`dispatch/governor.py`): running, waiting, KV usage and the TPOT sum and count, under the
#: names of vLLM (current and older), SGLang and llama.cpp (`backfill.metrics.LOAD_SAMPLES`)
LOAD_SAMPLES = metrics.LOAD_SAMPLES


def join_url(base: str, endpoint: str) -> str:
    """The full URL for `endpoint` on an upstream whose base URL is `base` (see module doc)."""
    base = base.rstrip("/")
    if not endpoint.startswith("/"):
        endpoint = "/" + endpoint
    if base.endswith("/v1") and (endpoint == "/v1" or endpoint.startswith("/v1/")):
        base = base[: -len("/v1")]
    return base + endpoint


def transport_failure(exc: BaseException) -> str:
    """What went wrong on the way to the upstream, in words that name no host, port or path:
    these messages go into users' error files, and the upstream's address is the operator's."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "name resolution failed"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError | asyncio.IncompleteReadError):
        return "the response was cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "the response was not valid HTTP"
    if isinstance(exc, ConnectionResetError):
        return "the connection was reset"
    if isinstance(exc, ConnectionError | OSError):
        return "connection failed"
    return "transport error"


class OpenAIEngine:
    """Forwards requests to one OpenAI-compatible upstream over HTTP/1.1 keep-alive."""

    def __init__(self, config: ModelConfig) -> None:
        if not config.url.startswith(("http://", "https://")):
            raise InvalidRequest(
                f"model {config.name!r}: url {config.url!r} must start with http:// or https://"
            )
        self.config = config
        self.model = config.name
        self.endpoints = frozenset(config.endpoints)
        self._no_metrics_until = 0.0
        self._metrics_read = False  # a whole page was parsed since the last failed scrape
        base = config.url.rstrip("/")
        self._metrics_url = URL(
            (base[: -len("/v1")] if base.endswith("/v1") else base) + "/metrics"
        )
        self._upstream_name = config.upstream_name
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, str] = {"Content-Type": "application/json"}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if key:
                self._headers["Authorization"] = f"Bearer {key}"

    async def start(self) -> None:
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(
            limit=0,  # see the module docstring: the dispatcher and the gateway limit
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ttl_dns_cache=DNS_CACHE_SECONDS,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            timeout=self._timeout,
            trust_env=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def url_for(self, endpoint: str) -> URL:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = URL(join_url(self.config.url, endpoint))
        return url

    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the Engine protocol's per-request budget)
    ) -> EngineReply:
        session = self._session
        if session is None:
            raise RuntimeError("OpenAIEngine.send() called before start()")
        url = self._urls.get(endpoint) or self.url_for(endpoint)
        upstream = self._upstream_name
        if upstream is not None and body.get("model") != upstream:
            body = {**body, "model": upstream}
        data = exact_json.dumps(body)
        request_timeout = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        try:
            async with session.post(url, data=data, timeout=request_timeout) as resp:
                raw = await resp.read()
                status = resp.status
                headers = resp.headers
                retry_after = headers.get("Retry-After")
                request_id = headers.get("x-request-id")
        except TimeoutError as exc:
            seconds = self.config.timeout if timeout is None else timeout
            raise EngineUnavailable(
                f"upstream {self.model!r} did not answer within {seconds:g}s",
                code="request_timeout",
            ) from exc
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise self._translate(exc, timeout) from exc
        return EngineReply(
            status,
            raw,
            None if retry_after is None else parse_retry_after(retry_after, time.time()),
            request_id,
        )

    def _translate(self, exc: BaseException, timeout: float | None) -> EngineUnavailable:
        if isinstance(exc, TimeoutError):
            seconds = self.config.timeout if timeout is None else timeout
            return EngineUnavailable(
                f"upstream {self.model!r} did not answer within {seconds:g}s",
                code="request_timeout",
            )
        return EngineUnavailable(
            f"upstream {self.model!r} unreachable: {transport_failure(exc)}",
            code="upstream_unavailable",
        )

    @contextlib.asynccontextmanager
    async def stream(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the per-request budget)
    ) -> AsyncIterator[StreamReply]:
        """Send one request; yield its status, headers and body bytes as they arrive."""
        session = self._session
        if session is None:
            raise RuntimeError("OpenAIEngine.stream() called before start()")
        url = self._urls.get(endpoint) or self.url_for(endpoint)
        upstream = self._upstream_name
        if upstream is not None and body.get("model") != upstream:
            body = {**body, "model": upstream}
        request_timeout = self._timeout if timeout is None else aiohttp.ClientTimeout(total=timeout)
        try:
            resp = await session.post(url, data=exact_json.dumps(body), timeout=request_timeout)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._translate(exc, timeout) from exc

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for data in resp.content.iter_any():
                    yield data
            except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
                raise self._translate(exc, timeout) from exc

        try:
            yield StreamReply(resp.status, resp.headers, chunks())
        finally:
            if resp.content.at_eof():
                resp.release()  # read to the end: the connection goes back to the pool
            else:
                resp.close()  # the client left early: drop the connection (vLLM aborts)

    async def probe(self) -> bool:
        """Whether the upstream answers (`GET /v1/models` below 500) within `PROBE_TIMEOUT`."""
        session = self._session
        if session is None:
            return False
        try:
            async with session.get(self.url_for("/v1/models"), timeout=PROBE_TIMEOUT) as resp:
                await resp.read()
                return resp.status < 500
        except (TimeoutError, aiohttp.ClientError, OSError, asyncio.IncompleteReadError,
                ValueError):  # fmt: skip
            return False

    async def load_metrics(self) -> dict[str, float] | None:
        """The upstream's `/metrics` (its `LOAD_SAMPLES`, every label folded: see `parse_load`),
        or None when it serves none."""
        session = self._session
        now = time.monotonic()
        if session is None or now < self._no_metrics_until:
            return None
        try:
            async with session.get(self._metrics_url, timeout=METRICS_TIMEOUT) as resp:
                if resp.status != 200:
                    self._no_metrics_until = now + METRICS_RETRY_SECONDS
                    self._metrics_read = False
                    return None
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            return None
        try:
            return self.parse_load(text)
        except ValueError:
            self._no_metrics_until = now + METRICS_RETRY_SECONDS
            self._metrics_read = False
            return None

    def parse_load(self, text: str) -> dict[str, float]:
        """The `LOAD_SAMPLES` of one `/metrics` page; `ValueError` if it is not Prometheus text
        (checked on the first page, and on the first after a failure: see the module doc).

        Every label is folded (none of the load samples has a dimension of its own): the
        series of several engines behind one server (vLLM's `engine="0"`, `engine="1"`,
        SGLang's `dp_rank`) and of several served models are summed, and the KV-usage ratios
        averaged (`backfill.metrics.RATIOS`)."""
        if self._metrics_read:
            return metrics.parse(text, keep_labels=(), only=LOAD_SAMPLES)
        figures = metrics.parse(text, keep_labels=())
        self._metrics_read = True
        return {k: v for k, v in figures.items() if k.startswith(LOAD_SAMPLES)}
