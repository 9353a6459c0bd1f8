"""Validation of a batch input file, one line at a time, with no I/O.

The caller streams the file in chunks of any size into `InputValidator.feed()`; the validator
splits lines itself, so memory is bounded by the longest line plus the set of custom_ids (which
must be kept to find duplicates). Each problem is reported with its 1-based line number, up to a
cap, so a user fixes a file in one round instead of one error per upload.

While validating it also plans the shards: contiguous byte ranges of the file holding up to
`shard_size` requests each, so workers later read only their own part of the input.

And it counts the batch's tokens, for the enqueued-token quotas (`domain/projects.py`): per
line, the prompt's tokens plus the output cap (`request_tokens`). The prompt is counted by the
model's own tokenizer when its engine runs in process and offers one (`token_counters`, one
call per line, so memory stays bounded), else estimated at ~4 bytes of request line a token.
The output cap is the request's `max_completion_tokens` / `max_tokens` / `max_output_tokens`,
times `n`; without one, 16 for `/v1/completions` (that API's default) and
`ValidationLimits.default_output_tokens` for chat and responses; embeddings and moderations
produce none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from backfill.domain import exact_json
from backfill.domain.records import BatchError, Shard

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    max_requests: int = 50_000
    #: inputs over all lines of an `/v1/embeddings` batch (see `embedding_inputs`); None: no
    #: cap (`backfill run`, which has no per-batch limits; the service passes its setting)
    max_embedding_inputs: int | None = None
    max_errors: int = 100
    max_line_bytes: int = 8 * 1024 * 1024
    shard_size: int = 2000
    #: estimated tokens allowed for one batch (None: no quota)
    max_enqueued_tokens: int | None = None
    #: output tokens counted for a chat or responses request without an output cap
    default_output_tokens: int = 0


@dataclass(slots=True)
class ValidationResult:
    total: int = 0
    model: str | None = None
    errors: list[BatchError] = field(default_factory=list)
    shards: list[Shard] = field(default_factory=list)
    estimated_tokens: int = 0
    embedding_inputs: int = 0  # `/v1/embeddings` batches only

    @property
    def ok(self) -> bool:
        return not self.errors


class InputValidator:
    """Feed bytes, then call `finish()` for the result."""

    def __init__(
        self,
        *,
        batch_id: str,
        endpoint: str,
        served: Mapping[str, frozenset[str]],
        limits: ValidationLimits,
        token_counters: Mapping[str, TokenCounter] | None = None,
    ) -> None:
        self._batch_id = batch_id
        self._endpoint = endpoint
        self._served = served
        self._limits = limits
        self._counters = token_counters or {}
        self._result = ValidationResult()
        self._ids: set[str] = set()
        self._carry = b""
        self._carry_start = 0  # file offset of the first byte of _carry
        self._offset = 0  # file offset of the next byte fed
        self._line_no = 0
        self._too_many_reported = False
        self._too_many_inputs_reported = False
        self._overflow = False
        # shard under construction
        self._shard_first_line = 0
        self._shard_start = 0
        self._shard_end = 0
        self._shard_count = 0

    # -- streaming -----------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        data = self._carry + chunk if self._carry else chunk
        base = self._carry_start if self._carry else self._offset
        self._offset += len(chunk)
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            self._line(data, pos, nl, base)
            pos = nl + 1
        rest = data[pos:]
        if len(rest) > self._limits.max_line_bytes and not self._overflow:
            # One enormous line: report it and skip to its end without holding it.
            self._overflow = True
            self._line_no += 1
            self._error("invalid_request", "Line is longer than the limit.", None)
            rest = b""
        self._carry = rest
        self._carry_start = base + pos

    def finish(self) -> ValidationResult:
        if self._carry or self._overflow:
            if self._overflow:
                self._overflow = False
                self._carry = b""
            else:
                data = self._carry
                self._line(data, 0, len(data), self._carry_start)
                self._carry = b""
        self._close_shard()
        r = self._result
        if r.total == 0 and not r.errors:
            self._error("empty_file", "The input file contains no requests.", None, line=None)
        if (
            self._limits.max_enqueued_tokens is not None
            and r.estimated_tokens > self._limits.max_enqueued_tokens
        ):
            self._error(
                "token_limit_exceeded",
                f"The batch needs about {r.estimated_tokens} tokens; the enqueued-token quota "
                f"is {self._limits.max_enqueued_tokens}.",
                None,
                line=None,
            )
        if r.errors:
            r.shards = []
        return r

    # -- one line ------------------------------------------------------------------------------
    def _line(self, data: bytes, start: int, end: int, base: int) -> None:
        self._line_no += 1
        if self._overflow:  # end of an over-long line already reported
            self._overflow = False
            return
        raw = data[start:end]
        if self._line_no == 1 and raw.startswith(BOM):
            raw = raw[3:]
        if not raw.strip():
            return
        if len(raw) > self._limits.max_line_bytes:
            self._error("invalid_request", "Line is longer than the limit.", None)
            return
        self._check(raw, base + start, base + end + 1)

    def _check(self, raw: bytes, line_start: int, line_end: int) -> None:
        try:
            obj = exact_json.loads(raw)  # as the worker will read it (`iter_requests`)
        except orjson.JSONDecodeError:
            self._error("invalid_json_line", "This line is not valid JSON.", None)
            return
        if not isinstance(obj, dict):
            self._error("invalid_json_line", "This line is not a JSON object.", None)
            return
        problem = _check_envelope(obj, self._endpoint)
        if problem is not None:
            self._error(*problem)
            return
        body: dict[str, Any] = obj["body"]
        if _nested_deeper_than(raw, MAX_BODY_DEPTH):
            self._error(
                "invalid_request",
                f"The body is nested more than {MAX_BODY_DEPTH} levels deep.",
                "body",
            )
            return
        model = body.get("model")
        if model is None:
            self._error("missing_required_parameter", "Missing body.model.", "body.model")
            return
        if not isinstance(model, str):
            self._error("invalid_request", "body.model must be a string.", "body.model")
            return
        endpoints = self._served.get(model)
        if endpoints is None:
            self._error("model_not_found", f"The model {model!r} is not served here.", "body.model")
            return
        if self._endpoint not in endpoints:
            self._error(
                "model_not_found",
                f"The model {model!r} does not serve {self._endpoint}.",
                "body.model",
            )
            return
        problem = _check_body(self._endpoint, body)
        if problem is not None:
            self._error(*problem)
            return
        r = self._result
        if r.model is None:
            r.model = model
        elif model != r.model:
            self._error(
                "model_mismatch",
                f"All requests in a batch must use the same model ({r.model!r}); "
                f"this line uses {model!r}.",
                "body.model",
            )
            return
        cid: str = obj["custom_id"]
        if cid in self._ids:
            self._error(
                "duplicate_custom_id",
                f"The custom_id {cid!r} appears more than once.",
                "custom_id",
            )
            return
        self._ids.add(cid)
        if r.total >= self._limits.max_requests:
            if not self._too_many_reported:
                self._too_many_reported = True
                self._error(
                    "too_many_tasks",
                    f"The file has more than {self._limits.max_requests} requests, "
                    "the limit per batch.",
                    None,
                )
            return
        cap = self._limits.max_embedding_inputs
        if cap is not None and self._endpoint == EMBEDDINGS:
            r.embedding_inputs += embedding_inputs(body.get("input"))
            if r.embedding_inputs > cap:
                if not self._too_many_inputs_reported:
                    self._too_many_inputs_reported = True
                    self._error(
                        "too_many_tasks",
                        f"The embedding inputs of the file add up to more than {cap} (at "
                        f"this line: {r.embedding_inputs}), the limit per /v1/embeddings batch.",
                        "body.input",
                    )
                return
        r.total += 1
        r.estimated_tokens += request_tokens(
            self._endpoint,
            raw,
            body,
            self._counters.get(model),
            self._limits.default_output_tokens,
        )
        self._add_to_shard(line_start, line_end)

    def _add_to_shard(self, line_start: int, line_end: int) -> None:
        if self._shard_count == 0:
            self._shard_first_line = self._line_no
            self._shard_start = line_start
        self._shard_end = line_end
        self._shard_count += 1
        if self._shard_count >= self._limits.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._shard_count == 0:
            return
        shards = self._result.shards
        shards.append(
            Shard(
                batch_id=self._batch_id,
                index=len(shards),
                first_line=self._shard_first_line,
                start=self._shard_start,
                end=min(self._shard_end, self._offset),
                count=self._shard_count,
            )
        )
        self._shard_count = 0

    def _error(self, code: str, message: str, param: str | None, line: int | None = -1) -> None:
        errors = self._result.errors
        if len(errors) < self._limits.max_errors:
            errors.append(
                BatchError(
                    code=code,
                    message=message,
                    param=param,
                    line=self._line_no if line == -1 else line,
                )
            )


EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"


def _check_body(endpoint: str, body: dict[str, Any]) -> tuple[str, str, str] | None:
    """The (code, message, param) of a body that misses what its endpoint requires, or None.

    Only what every server of the endpoint requires: a Responses request's `input` (a string or
    a list of items) and a moderation's `input` (a string or a non-empty list). What a
    particular engine cannot serve (tools, images) is its per-line 400 when the line runs."""
    if endpoint not in (RESPONSES, MODERATIONS):
        return None
    value = body.get("input")
    if value is None:
        return ("missing_required_parameter", "Missing required parameter: 'input'.", "body.input")
    if not isinstance(value, str | list) or (isinstance(value, list) and not value):
        return (
            "invalid_request",
            "body.input must be a string or a non-empty list.",
            "body.input",
        )
    return None


def embedding_inputs(value: Any) -> int:
    """How many inputs an embeddings request's `input` holds, as OpenAI counts them for its
    per-batch limit: a string or one token array (a list of integers) is 1 input; a list of
    strings or of token arrays is one input an element. Anything else counts 1 (the engine
    rejects it later)."""
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return 1
        return len(value)
    return 1


def _check_envelope(obj: dict[str, Any], endpoint: str) -> tuple[str, str, str] | None:
    """The (code, message, param) of the first problem with the request envelope, or None."""
    checks: list[tuple[str, type, Callable[[Any], bool] | None]] = [
        ("custom_id", str, None),
        ("method", str, None),
        ("url", str, None),
        ("body", dict, None),
    ]
    for key, kind, _ in checks:
        if key not in obj or obj[key] is None:
            return ("missing_required_parameter", f"Missing required parameter: {key!r}.", key)
        if not isinstance(obj[key], kind):
            name = "an object" if kind is dict else "a string"
            return ("invalid_request", f"{key!r} must be {name}.", key)
    if obj["method"].upper() != "POST":
        return ("invalid_request", "Only the POST method is supported in a batch.", "method")
    if obj["url"] != endpoint:
        return (
            "url_mismatch",
            f"The url {obj['url']!r} does not match the batch endpoint {endpoint!r}.",
            "url",
        )
    if obj["body"].get("stream") is True:
        return ("invalid_request", "Streaming is not supported in a batch.", "body.stream")
    return None


#: counts a request body's prompt tokens for one model (None: cannot, estimate instead)
TokenCounter = Callable[[str, dict[str, Any]], int | None]

COMPLETIONS = "/v1/completions"
#: the legacy completions API's own default `max_tokens`
COMPLETIONS_DEFAULT_OUTPUT = 16


log = logging.getLogger("backfill.validation")
#: kinds of token-counting failure already logged (each is logged once per process)
_COUNT_FAILURES_LOGGED: set[type[BaseException]] = set()


def request_tokens(
    endpoint: str,
    raw: bytes,
    body: dict[str, Any],
    counter: TokenCounter | None = None,
    default_output: int = 0,
) -> int:
    """The tokens one request is counted for in the quotas: its prompt (by `counter`, the
    model's tokenizer, when it gives a count; else ~4 bytes of the line a token) plus its
    output cap (see the module docstring)."""
    prompt: int | None = None
    if counter is not None:
        try:
            prompt = counter(endpoint, body)
        except Exception as exc:  # a tokenizer that trips on this body: the estimate will do
            prompt = None
            if type(exc) not in _COUNT_FAILURES_LOGGED:  # once per kind: never silent, no flood
                _COUNT_FAILURES_LOGGED.add(type(exc))
                log.warning("counting tokens failed, estimating instead: %r", exc, exc_info=True)
    if prompt is None:
        prompt = len(raw) // 4
    return prompt + output_cap(endpoint, body, default_output)


def output_cap(endpoint: str, body: dict[str, Any], default_output: int = 0) -> int:
    if endpoint in (EMBEDDINGS, MODERATIONS):
        return 0
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            cap = value
            break
    else:
        cap = COMPLETIONS_DEFAULT_OUTPUT if endpoint == COMPLETIONS else default_output
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        cap *= n
    return cap


#: deepest request body accepted: more than any API needs, and well inside what every JSON
#: writer on the way to the engine handles (orjson writes 254 levels, the standard library
#: about 990; `exact_json.dumps` falls back from one to the other)
MAX_BODY_DEPTH = 512


def _nested_deeper_than(raw: bytes, limit: int) -> bool:
    """Whether the JSON text `raw` nests objects and arrays deeper than `limit` (brackets
    inside strings do not count). Most lines have far fewer brackets than the limit and are
    answered by a count; only the rest are scanned."""
    if raw.count(b"{") + raw.count(b"[") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x7D, 0x5D):  # } ]
            depth -= 1
    return False
