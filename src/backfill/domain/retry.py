"""Retry policy for requests sent to an engine: which answers are worth another try, and when.

Pure and deterministic: the caller supplies the random number (`rand` in [0, 1)) and, for
HTTP-dates, the current time, so unit tests pin every branch without a clock or a RNG.

Decisions:
- `status is None` means the request never produced an HTTP answer (refused, reset, timeout):
  always worth retrying. 408, 409, 429 and every 5xx are retried, exactly the set the official
  `openai` SDK retries, so an upstream that is itself an OpenAI-compatible proxy behaves the same
  behind backfill as in front of the SDK. Other 4xx are final: the request itself is wrong
  (context too long, bad parameter) and sending it again only burns capacity.
- Backoff is exponential (`base_delay * 2**(attempt-1)`, capped at `max_delay`) with jitter so
  that thousands of requests that failed together do not come back together. "equal" jitter
  (half fixed, half random) is the default: it keeps a floor under the wait, which matters when
  an upstream is overloaded; "full" spreads more; "none" is for tests and debugging.
- A server's `Retry-After` is a floor, never a ceiling: we wait at least that long (capped at
  `max_retry_after` so a hostile or buggy header cannot park a request for a day).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal

Jitter = Literal["full", "equal", "none"]

#: 4xx answers that may succeed on a later attempt (timeout, conflict/lock, rate limit).
RETRYABLE_4XX = frozenset({408, 409, 429})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times to try one request, and how long to wait in between.

    `attempts` counts every try including the first, so `attempts=1` means "never retry".
    """

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    jitter: Jitter = "equal"
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays must be >= 0")

    def should_retry(self, status: int | None) -> bool:
        """Whether an answer with this status (None: no answer at all) is worth another try."""
        if status is None:
            return True
        return status >= 500 or status in RETRYABLE_4XX

    def can_retry(self, attempt: int, status: int | None) -> bool:
        """Whether attempt number `attempt` (1-based) that ended with `status` gets a successor."""
        return attempt < self.attempts and self.should_retry(status)

    def backoff(self, attempt: int, rand: float) -> float:
        """Jittered exponential backoff after attempt number `attempt` (1-based) failed."""
        exponent = max(attempt - 1, 0)
        # 2**exponent overflows floats for silly attempt counts; the cap makes them equal anyway.
        ceiling = (
            self.max_delay
            if exponent >= 64
            else min(self.max_delay, self.base_delay * 2.0**exponent)
        )
        rand = min(max(rand, 0.0), 1.0)
        if self.jitter == "full":
            return ceiling * rand
        if self.jitter == "equal":
            return ceiling / 2 + ceiling / 2 * rand
        return ceiling

    def delay(self, attempt: int, retry_after: float | None, rand: float) -> float:
        """Seconds to wait before the next attempt: backoff, but at least the server's wish."""
        wait = self.backoff(attempt, rand)
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds or an HTTP-date (relative to `now`).

    Returns None when the header is missing or unreadable; never a negative number.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if seconds == seconds else None  # NaN is unreadable
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is read as UTC
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - now, 0.0)
