"""One request in, exactly one line out: the invariant, in one place.

`run_request` is what both request runners (the worker's `ShardRun` and the offline
`backfill run`) call for every input line. It returns the line that says what really happened,
and never raises for a request's own sake:
- an answer (2xx to the output file; anything else, as the upstream sent it, to the error
  file), or a transport failure with its code (`upstream_unavailable`, `request_timeout`,
  `invalid_upstream_response`);
- an unexpected exception anywhere on the way (a bug, a body the JSON writer cannot handle)
  becomes this line's `internal_error`, with the traceback in the log;
- None only when the caller stopped the request before it reached the engine (cancel, expiry,
  shutdown): then there is no outcome yet, and the line is run again or given
  `batch_cancelled` / `batch_expired` by finalization.
Cancellation (`CancelledError`) propagates: the caller cancelled it, so it has no outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from backfill.dispatch.dispatcher import Dispatcher, Outcome
from backfill.domain.records import Usage
from backfill.domain.results import (
    ERROR,
    OUTPUT,
    ResultKind,
    error_line,
    parse_body,
    response_line,
    usage_from_body,
)

log = logging.getLogger("backfill.worker")

INTERNAL_ERROR = "internal_error"
MODEL_GONE = "model_not_found"


@dataclass(frozen=True, slots=True)
class Line:
    """A finished request's line and which file it goes to."""

    kind: ResultKind
    line: bytes
    usage: Usage
    ok: bool
    #: seconds it spent at the engine, every attempt (0 when it never got there)
    engine_seconds: float = 0.0


def outcome_line(custom_id: str, outcome: Outcome) -> Line:
    if outcome.status is None:
        code = outcome.error_code or "upstream_unavailable"
        return Line(ERROR, error_line(custom_id, code, outcome.message or ""), Usage(), False)
    parsed = outcome.parsed
    if parsed is None:
        parsed = parse_body(outcome.body, outcome.status)
    line = response_line(custom_id, outcome.status, parsed, outcome.request_id, outcome.body)
    return Line(OUTPUT if outcome.ok else ERROR, line, usage_from_body(parsed), outcome.ok)


def internal_error(custom_id: str, exc: BaseException) -> Line:
    message = (
        f"backfill failed while processing this request ({type(exc).__name__}); "
        "the operator's log has the details."
    )
    return Line(ERROR, error_line(custom_id, INTERNAL_ERROR, message), Usage(), False)


async def run_request(
    dispatcher: Dispatcher | None,
    endpoint: str,
    custom_id: str,
    body: dict[str, Any],
    *,
    where: str = "",
    defer_until: float = float("inf"),
    stopped: Callable[[], bool] | None = None,
    group: bytes | None = None,
    scope: str = "",
) -> Line | None:
    """Run one request to its line (see the module doc). `where` names it in the log;
    `group` is its prefix group (`domain/planning.py`), for the dispatcher's order; `scope`
    (the batch's project) bounds which identical requests may share one call."""
    try:
        if dispatcher is None:
            message = "The model is no longer served."
            return Line(ERROR, error_line(custom_id, MODEL_GONE, message), Usage(), False)
        outcome = await dispatcher.run(
            endpoint, body, defer_until=defer_until, stopped=stopped, group=group, scope=scope
        )
        if not outcome.sent:
            return None
        return replace(outcome_line(custom_id, outcome), engine_seconds=outcome.engine_seconds)
    except Exception as exc:
        log.exception("request %r %s failed inside backfill", custom_id, where)
        return internal_error(custom_id, exc)
