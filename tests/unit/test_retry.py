"""RetryPolicy: what is retried, how the wait grows, Retry-After, jitter bounds."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from backfill.domain.retry import RetryPolicy, parse_retry_after


@pytest.mark.parametrize("status", [None, 408, 409, 429, 500, 502, 503, 504, 507, 599])
def test_retryable_statuses(status: int | None) -> None:
    assert RetryPolicy().should_retry(status)


@pytest.mark.parametrize("status", [200, 201, 204, 400, 401, 403, 404, 413, 422])
def test_final_statuses(status: int) -> None:
    assert not RetryPolicy().should_retry(status)


def test_can_retry_counts_attempts() -> None:
    policy = RetryPolicy(attempts=3)
    assert policy.can_retry(1, 500)
    assert policy.can_retry(2, None)
    assert not policy.can_retry(3, 500)  # the third attempt was the last
    assert not policy.can_retry(1, 400)
    assert not RetryPolicy(attempts=1).can_retry(1, 503)


def test_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_backoff_grows_exponentially_then_caps() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=4.0, jitter="none")
    assert [policy.delay(a, None, 0.3) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.delay(10_000, None, 0.3) == 4.0  # no overflow for absurd attempt numbers


def test_full_jitter_bounds() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0, jitter="full")
    assert policy.delay(3, None, 0.0) == 0.0
    assert policy.delay(3, None, 0.5) == 2.0
    assert policy.delay(3, None, 1.0) == 4.0


def test_equal_jitter_keeps_a_floor() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=60.0, jitter="equal")
    assert policy.delay(3, None, 0.0) == 2.0
    assert policy.delay(3, None, 0.999) == pytest.approx(3.998)
    for rand in (0.0, 0.1, 0.5, 0.9, 0.99999):
        assert 2.0 <= policy.delay(3, None, rand) <= 4.0


def test_rand_out_of_range_is_clamped() -> None:
    policy = RetryPolicy(base_delay=1.0, jitter="full")
    assert policy.delay(1, None, -3.0) == 0.0
    assert policy.delay(1, None, 7.0) == 1.0


def test_deterministic_given_rand() -> None:
    policy = RetryPolicy()
    assert policy.delay(4, None, 0.123) == policy.delay(4, None, 0.123)


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=30.0, jitter="none")
    assert policy.delay(1, 7.0, 0.5) == 7.0  # longer than the backoff: honoured
    assert policy.delay(5, 1.0, 0.5) == 8.0  # shorter than the backoff: backoff wins
    assert policy.delay(1, 0.0, 0.5) == 0.5


def test_retry_after_is_capped() -> None:
    policy = RetryPolicy(jitter="none", max_retry_after=120.0)
    assert policy.delay(1, 86_400.0, 0.5) == 120.0


def test_parse_retry_after_seconds() -> None:
    assert parse_retry_after("3", now=0.0) == 3.0
    assert parse_retry_after(" 1.5 ", now=0.0) == 1.5
    assert parse_retry_after("-4", now=0.0) == 0.0
    assert parse_retry_after(None, now=0.0) is None
    assert parse_retry_after("", now=0.0) is None
    assert parse_retry_after("soon", now=0.0) is None
    assert parse_retry_after("nan", now=0.0) is None


def test_parse_retry_after_http_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()
    later = format_datetime(datetime(2025, 1, 1, 12, 0, 30, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(later, now=now) == 30.0
    earlier = format_datetime(datetime(2025, 1, 1, 11, 0, 0, tzinfo=UTC), usegmt=True)
    assert parse_retry_after(earlier, now=now) == 0.0
