"""Settings: `BACKFILL_*` environment variables, a TOML config file, then CLI flags on top.

Built once at the entry point and passed down; nothing reads the environment later.

Model specs on the command line: `NAME=URL` routes `body.model == NAME` to the OpenAI-compatible
upstream at URL (e.g. `http://127.0.0.1:8000/v1`); `NAME=URL#UPSTREAM` also renames the model
on the way out. The TOML file declares the same with per-model options:

```toml
[server]
host = "0.0.0.0"
port = 8000

[models.llama]
url = "http://gpu-1:8000/v1"
upstream_name = "meta-llama/Llama-3.1-8B-Instruct"
max_concurrency = 128
attempts = 5
timeout = 600
api_key_env = "LLAMA_API_KEY"

[models.tiny]                       # in-process generation (pip install "backfill[local]")
kind = "transformers"
path = "/models/my-llama"           # a local Hugging Face folder, or a hub id when online

[models.minilm]                     # in-process sentence embeddings
kind = "embeddings"
path = "/models/all-MiniLM-L6-v2"
options = { batch_wait_ms = 5 }     # engine-specific knobs (see the engine's module doc)

[pricing]
batch_discount = 0.5                # share taken off the real-time price for batches (default)

[prices.llama]                      # real-time price per million tokens (`domain/pricing.py`)
input = 0.15
cached_input = 0.075                # default: the input price
output = 0.60
currency = "USD"                    # the default; shown lowercase, as OpenAI's costs API does
batch_discount = 0.5                # this model's; default: [pricing] batch_discount
```

On the command line, `NAME=transformers:PATH` and `NAME=embeddings:PATH` select the in-process
engines; anything else after `NAME=` is an upstream URL, or several separated by commas
(`NAME=URL1,URL2[#UPSTREAM]`): replicas of the same model (`engines/replicas.py`). In TOML:

```toml
[models.llama]
urls = ["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"]
routing = "affinity"                # or "least_loaded", "round_robin"
max_concurrency = 256               # the model's, across its replicas
```
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from backfill.errors import InvalidRequest

MB = 1024 * 1024


#: every endpoint a model may declare in `endpoints` (the batch endpoints OpenAI accepts)
KNOWN_ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
)
#: what an upstream (kind `openai`) serves when the config does not list its endpoints; an
#: upstream that serves `/v1/moderations` says so (`endpoints = [..., "/v1/moderations"]`)
UPSTREAM_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
#: endpoints each in-process engine kind serves when the config does not list them; chat
#: engines serve `/v1/responses` translated to chat (`domain/responses_api.py`)
IN_PROCESS_ENDPOINTS: dict[str, list[str]] = {
    "transformers": ["/v1/chat/completions", "/v1/completions", "/v1/responses"],
    "embeddings": ["/v1/embeddings"],
}


class ModelConfig(BaseModel):
    name: str
    kind: str = "openai"
    url: str = ""  # upstream base URL (kind "openai"); unused by in-process kinds
    #: several upstream base URLs serving the same model (replicas, `engines/replicas.py`);
    #: `url` is then the first of them
    urls: list[str] = Field(default_factory=list)
    #: how requests are spread over `urls`: the replica that holds the request's prompt prefix
    #: unless it is much busier (`affinity`), the least-loaded one, or in turn
    routing: Literal["affinity", "least_loaded", "round_robin"] = "affinity"
    path: str | None = None  # model folder or hub id (in-process kinds)
    options: dict[str, Any] = Field(default_factory=dict)  # engine-specific knobs
    upstream_name: str | None = None
    max_concurrency: int = Field(default=256, ge=1)
    attempts: int = Field(default=5, ge=1)
    timeout: float = Field(default=600.0, gt=0)
    api_key_env: str | None = None
    #: the upstream accepts vLLM's `priority` body field (lower runs first); a plain OpenAI
    #: server rejects unknown fields, hence off by default
    priority: bool = False
    #: adaptive batch concurrency (see `dispatch/governor.py`); on unless false (None, the
    #: default, is on). Without engine metrics it is dormant, the batch at `max_concurrency`,
    #: until the first real-time request for the model passes backfill's gateway
    governor: bool | None = None
    endpoints: list[str] = Field(default_factory=lambda: list(UPSTREAM_ENDPOINTS))
    #: identical batch requests sent once, the answer given to each line
    #: (`domain/duplicates.py`): "deterministic" (temperature 0, a fixed seed, embeddings),
    #: "all" (any body), "off"
    dedup: Literal["deterministic", "all", "off"] = "deterministic"
    #: prefix groups in the window (`dispatch/hot_groups.py`; needs `plan_prefixes`): a freed
    #: slot goes to a request whose group is at the engine or just finished (aging bounds the
    #: wait of the others), and a cold group sends one request first; false: first come first
    #: served, every request of a group at once
    hot_groups: bool = True
    #: seconds after a cold group's first request reached the engine at which the group's
    #: others go even if it has not ended yet (`dispatch/warmup.py`); 0: no warm-up. Default:
    #: 2 s for one upstream (1.115x on bench/prefix.py's 20,000 requests), 0 for replicas
    #: (with 4 replicas it cost ~15% more GPU-seconds in bench/replicas.py --plan: while a
    #: cold group sends one request,
    #: the window fills with other groups' first requests, more prefixes than each replica holds)
    group_warmup: float | None = Field(default=None, ge=0)

    @property
    def warmup_seconds(self) -> float:
        if self.group_warmup is not None:
            return self.group_warmup
        return 0.0 if len(self.urls) > 1 else 2.0

    @model_validator(mode="after")
    def _kind_defaults(self) -> ModelConfig:
        unknown = [e for e in self.endpoints if e not in KNOWN_ENDPOINTS]
        if unknown:
            raise ValueError(
                f"model {self.name!r}: unknown endpoints {unknown} (known: "
                f"{', '.join(KNOWN_ENDPOINTS)})"
            )
        if self.kind in IN_PROCESS_ENDPOINTS and "endpoints" not in self.model_fields_set:
            self.endpoints = list(IN_PROCESS_ENDPOINTS[self.kind])
        if self.kind == "embeddings" and "max_concurrency" not in self.model_fields_set:
            # in flight = what the engine can gather for its next forward pass while one runs
            self.max_concurrency = 1024
        if self.urls:
            if len(set(self.urls)) != len(self.urls):
                raise ValueError(f"model {self.name!r}: urls lists a url twice")
            if not self.url:
                self.url = self.urls[0]
            elif self.url not in self.urls:
                raise ValueError(f"model {self.name!r}: give url or urls, not both")
        if self.kind == "openai" and not self.url:
            raise ValueError(f"model {self.name!r}: kind 'openai' needs a url")
        return self

    @property
    def upstream_urls(self) -> list[str]:
        """Every upstream base URL of the model: its replicas, or its one `url`."""
        return list(self.urls) if self.urls else [self.url]


class WebhookConfig(BaseModel):
    """An endpoint from the config file's `[[webhooks]]` (`url`, `secret`, `project`,
    `events`): kept in the store while the file lists it (`webhooks/endpoints.py`)."""

    model_config = {"extra": "forbid", "frozen": True}

    url: str
    secret: str  # whsec_...: `backfill webhooks secret` makes one
    project: str = "default"
    events: list[str] = Field(
        default_factory=lambda: ["batch.completed", "batch.failed", "batch.expired",
                                 "batch.cancelled"]
    )  # fmt: skip
    name: str = ""


class PriceConfig(BaseModel):
    """A model's real-time price per million tokens (`[prices.MODEL]`), in `currency`; batch
    work pays it less `batch_discount` (None: the global `batch_discount`). Decimals with at
    most 6 places: money is priced in integer micro-units (`domain/pricing.py`)."""

    model_config = {"extra": "forbid", "frozen": True}

    input: Decimal = Field(ge=0, decimal_places=6)
    output: Decimal = Field(ge=0, decimal_places=6)
    cached_input: Decimal | None = Field(default=None, ge=0, decimal_places=6)
    currency: str = Field(default="USD", pattern=r"^[A-Za-z]{3}$")
    batch_discount: Decimal | None = Field(default=None, ge=0, le=1, decimal_places=6)

    @model_validator(mode="after")
    def _lower_currency(self) -> PriceConfig:
        # ISO 4217 codes, shown lowercase as OpenAI's costs API shows them ("usd")
        object.__setattr__(self, "currency", self.currency.lower())
        return self


class Settings(BaseSettings):
    # frozen: built once at the entry point and passed down; a variant is a `model_copy`
    model_config = SettingsConfigDict(env_prefix="BACKFILL_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("./backfill-data")
    database: str | None = None  # default: sqlite:///<data_dir>/backfill.db
    storage: str | None = None  # default: local folder <data_dir>/blobs
    api_keys: list[str] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    #: with no model configured, serve the default models (`backfill[local]`): the packaged
    #: all-MiniLM-L6-v2 for embeddings and, with `default_chat_model`, SmolLM2-135M-Instruct
    default_model: bool = True
    default_chat_model: bool = True  # the chat model too (fetched and converted at first start)
    run_worker: bool = True
    run_scheduler: bool = True

    max_upload_bytes: int = 200 * MB  # OpenAI's limit for batch files
    max_requests_per_batch: int = 50_000
    #: inputs over all lines of one `/v1/embeddings` batch (OpenAI's limit)
    max_embedding_inputs_per_batch: int = 50_000
    #: uploads with purpose "batch" and no `expires_after` expire this long after upload, as
    #: at OpenAI (30 days); 0 or None: kept until deleted
    batch_file_expiry_seconds: int | None = 30 * 86400
    max_validation_errors: int = 100
    min_completion_window: int = 3600
    max_completion_window: int = 7 * 86400
    max_line_bytes: int = 8 * MB
    max_enqueued_tokens: int | None = None  # estimated tokens per batch; None: no quota
    #: output tokens a chat or responses request without an output cap is counted for in the
    #: enqueued-token quotas (`domain/validation.py`)
    enqueued_output_tokens: int = 1024
    #: seconds a project's settings (`backfill projects set`) may be cached where they apply
    project_settings_ttl: float = 2.0

    shard_size: int = 2000  # requests per shard
    #: dispatch each shard's requests grouped by prompt prefix, long outputs first in a group
    #: (`domain/planning.py`); false: in input order
    plan_prefixes: bool = True
    lease_seconds: float = 30.0
    flush_every_requests: int = 1000
    flush_every_seconds: float = 1.0
    #: shards one worker keeps running whatever the models' room (batches of one model share
    #: its window this way, fairly between projects)
    worker_shards: int = Field(default=4, ge=1)
    #: beyond `worker_shards`, a worker leases more while a model's dispatcher has room its
    #: running shards do not fill (many small batches), up to this many shards at once
    worker_max_shards: int = Field(default=256, ge=1)
    scheduler_interval: float = 0.5
    cancel_grace_seconds: float = 10.0  # in-flight requests may finish within this
    retention_interval: float = 60.0  # how often expired files are deleted
    #: real-time prices per model (`[prices.MODEL]`); a model without one is recorded at 0
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    #: the share of the real-time price taken off batch work, unless a model's price says
    batch_discount: Decimal = Field(default=Decimal("0.5"), ge=0, le=1, decimal_places=6)
    #: fair-share weights of projects by name when batches compete for workers (default 1);
    #: a project's own weight (`backfill projects set --weight`) wins
    project_weights: dict[str, float] = Field(default_factory=dict)

    # real-time gateway (`api/realtime.py`): per-project token buckets, separate from batches
    #: a project's own limits (`backfill projects set --realtime-rpm/--realtime-tpm`) win
    realtime_rpm: float = 6000.0  # requests per minute per project; 0: unlimited
    realtime_tpm: float | None = None  # tokens per minute per project (estimated); None: off
    realtime_priority: int = 0  # vLLM `priority` for real-time requests (lower runs first)
    batch_priority: int = 10  # vLLM `priority` for batch requests

    # governor (`dispatch/governor.py`): batch concurrency from live load signals
    governor_ttft_inflation: float = 1.10  # allowed p99 real-time TTFT / what it would be alone
    governor_tpot_inflation: float = 1.20  # allowed p99 real-time TPOT / what it would be alone
    governor_interval: float = 0.1  # seconds between decisions (and metrics scrapes)
    governor_min_limit: int = 1  # batch requests always allowed in flight
    governor_window_seconds: float = 60.0  # memory of real-time load (the reference peak)
    #: memory of the highest reference peak: quiet hours are planned against the day's peak
    governor_day_seconds: float = Field(default=86400.0, gt=0)
    governor_idle_seconds: float = 5.0  # no real-time traffic this long: grow to the ceiling
    governor_abort: bool = True  # abort batch requests over the limit when real-time load jumps
    #: while real time is active, batch prompts over this many (estimated) tokens go only when
    #: no shorter batch request is waiting (`Dispatcher.set_defer`); 0: never defer
    governor_defer_prompt_tokens: int = 512
    #: "governor": the step-time model (`dispatch/policy.py`); "aimd": the admission baseline
    #: it is measured against (`dispatch/aimd.py`, for comparisons), which needs the absolute
    #: p99 targets below (ms, as the gateway measures them; 0: aimd refuses to start)
    governor_policy: Literal["governor", "aimd"] = "governor"
    governor_aimd_ttft_ms: float = Field(default=0.0, ge=0)
    governor_aimd_tpot_ms: float = Field(default=0.0, ge=0)

    # HTTP limits (`api/protocol.py`, `api/auth.py`, `api/health.py`; README "HTTP limits"):
    # what one client may hold of the server before it is cut off or refused
    http_max_header_bytes: int = 64 * 1024  # request line + headers; 431 above it
    http_max_headers: int = 100  # header fields per request; 431 above it
    #: from a new connection, or a request's first byte, to the end of its headers; past it the
    #: request gets 408 (a connection that sent nothing is just closed)
    http_header_timeout_seconds: float = 20.0
    http_body_idle_seconds: float = 30.0  # a request body stalled this long between chunks: 408
    #: idle keep-alive connections are kept longer than clients' own pools do (httpx 5 s,
    #: aiohttp 15 s): a client reusing a connection just as the server closes it gets a reset
    http_keep_alive_seconds: int = 75
    #: open connections; at the cap the longest-idle one is closed to make room, and when every
    #: connection runs a request a new one is answered 503 with `retry-after`
    http_max_connections: int = 2048
    auth_failure_limit: int = 20  # failed keys per client address per window, then 429; 0: off
    auth_failure_window_seconds: float = 60.0
    ready_timeout_seconds: float = 2.0  # each `/health/ready` probe (store, blobs) at most

    # stuck store (`store/engine.py`, `api/responses.py`, `outages.py`): a database locked by
    # someone else costs a request a few seconds and a 503, never a hang or the whole API
    #: seconds a store call waits for a lock (SQLite's write lock, PostgreSQL's lock_timeout)
    #: or a pooled connection before it gives up: 503 `store_busy` with `retry-after`
    store_busy_timeout: float = 5.0
    #: while the store or the blobs fail, background duties retry at growing intervals up to this
    outage_backoff_max: float = 30.0

    # inputs, keys and debris (`scheduler/collector.py`): what crashes leave behind is collected
    #: a staging file of an upload (or any write) untouched this long is debris; keep it well
    #: above the time an upload takes to send 5 MiB (a local upload writes once per 5 MiB part)
    debris_grace_seconds: float = 3600.0
    #: one debris collection per this long, across every process sharing the store
    debris_interval_seconds: float = 600.0

    # webhooks (`webhooks/`): OpenAI's batch events, signed the Standard Webhooks way, from an
    # outbox in the store, at least once; endpoints come from `backfill webhooks add`, the API
    # (`/v1/webhook_endpoints`) and the config file's `[[webhooks]]`
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    webhook_retry_first_seconds: float = 5.0  # after the first failed attempt; doubling
    webhook_retry_max_seconds: float = 3600.0  # the longest wait between attempts
    webhook_give_up_seconds: float = 72 * 3600.0  # an event this old is not tried again
    webhook_timeout_seconds: float = 15.0  # one attempt, connect to answer
    webhook_interval: float = 1.0  # seconds between looks at the outbox
    webhook_concurrency: int = 16  # attempts in flight per process
    #: delivered and failed deliveries are kept this long (`backfill webhooks list` shows them)
    webhook_retention_seconds: float = 7 * 86400.0

    @model_validator(mode="after")
    def _worker_bounds(self) -> Settings:
        if self.worker_max_shards < self.worker_shards:
            raise ValueError(
                f"worker_max_shards ({self.worker_max_shards}) is below worker_shards "
                f"({self.worker_shards}), the number a worker always runs"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{(self.data_dir / 'backfill.db').resolve()}"


def parse_model_spec(spec: str) -> ModelConfig:
    """`NAME=URL[,URL...][#UPSTREAM_NAME]`, `NAME=transformers:PATH` or `NAME=embeddings:PATH`
    -> ModelConfig. `NAME=embeddings:` (no path) means the packaged all-MiniLM-L6-v2; several
    URLs are replicas of one model."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise InvalidRequest(
            f"bad --model {spec!r}: expected NAME=URL[,URL...][#UPSTREAM_NAME], "
            "NAME=transformers:PATH "
            "or NAME=embeddings:PATH"
        )
    kind, colon, path = rest.partition(":")
    if colon and kind in IN_PROCESS_ENDPOINTS:
        if kind == "transformers" and not path.strip():
            raise InvalidRequest(f"bad --model {spec!r}: transformers needs a PATH")
        return ModelConfig(name=name.strip(), kind=kind, path=path.strip() or None)
    url, _, upstream = rest.partition("#")
    upstream_name = upstream.strip() or None
    urls = [u.strip() for u in url.split(",")]
    if len(urls) > 1:
        if not all(urls):
            raise InvalidRequest(f"bad --model {spec!r}: an empty URL between commas")
        return ModelConfig(name=name.strip(), urls=urls, upstream_name=upstream_name)
    return ModelConfig(name=name.strip(), url=url.strip(), upstream_name=upstream_name)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config into keyword arguments for `Settings`."""
    with path.open("rb") as fh:
        raw = tomllib.load(fh)
    out: dict[str, Any] = dict(raw.get("server", {}))
    for key in ("limits", "worker"):
        out.update(raw.get(key, {}))
    pricing = dict(raw.get("pricing", {}))
    if pricing:  # [pricing] holds the default batch discount, nothing else
        unknown = sorted(set(pricing) - {"batch_discount"})
        if unknown:
            raise InvalidRequest(f"[pricing] takes batch_discount only, not {', '.join(unknown)}")
        out["batch_discount"] = pricing["batch_discount"]
    models = raw.get("models", {})
    if isinstance(models, dict):
        out["models"] = [ModelConfig(name=n, **opts) for n, opts in models.items()]
    elif isinstance(models, list):
        out["models"] = [ModelConfig(**m) for m in models]
    if "prices" in raw:
        out["prices"] = {name: PriceConfig(**opts) for name, opts in raw["prices"].items()}
    if "webhooks" in raw:
        out["webhooks"] = [WebhookConfig(**w) for w in raw["webhooks"]]
    return out


def build_settings(
    config_file: Path | None = None,
    model_specs: list[str] | None = None,
    extra_api_keys: list[str] | None = None,
    **overrides: Any,
) -> Settings:
    """Environment < config file < CLI overrides (None values are ignored). `model_specs`
    (`--model`) replace same-named models and add the rest; `extra_api_keys` (`--api-key`) are
    added to the keys from the environment and the file."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    update: dict[str, Any] = {}
    if model_specs:
        by_name = {m.name: m for m in settings.models}
        for spec in model_specs:
            m = parse_model_spec(spec)
            by_name[m.name] = m
        update["models"] = list(by_name.values())
    if extra_api_keys:
        update["api_keys"] = [*settings.api_keys, *extra_api_keys]
    return settings.model_copy(update=update) if update else settings
