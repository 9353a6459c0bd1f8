"""A project's quotas and limits (`backfill projects set`), and the words of their refusals.

Every field is optional: None means "the server's default" (the settings), so a project
without settings behaves exactly as before projects had any. They are stored as one JSON
object on the project's row (`to_json` / `from_json`, unknown keys ignored so an older server
reads a newer row) and read where they apply, at most a few seconds old:

- `token_limits`: enqueued tokens per model. A project's *enqueued tokens* for a model are the
  estimated tokens (`batches.enqueued_tokens`, counted at validation: see
  `domain/validation.py`) of its batches not yet finished (validating, in_progress,
  finalizing, cancelling). A batch that would take them over the limit fails validation with
  `token_limit_exceeded` and OpenAI's message, as OpenAI fails it. The store checks and starts
  the batch in one transaction (`Store.start_batch`), so two batches validating at once cannot
  both slip under the limit.
- `max_active_batches`: unfinished batches at once; one more is refused when created (429
  `active_batch_limit_exceeded`, not retryable by the SDK: the next slot opens when a batch
  finishes, minutes away, not a few back-off seconds). Checked in the insert's transaction.
- `weight`: the project's fair share of the workers (`domain/ordering.py`); overrides
  `Settings.project_weights`.
- `realtime_rpm` / `realtime_tpm`: the gateway's per-project limits; override
  `Settings.realtime_rpm` / `realtime_tpm` (0 rpm / tpm: unlimited).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class ProjectSettings:
    token_limits: Mapping[str, int] = field(default_factory=dict)
    max_active_batches: int | None = None
    weight: float | None = None
    realtime_rpm: float | None = None
    realtime_tpm: float | None = None

    def to_json(self) -> dict[str, Any] | None:
        """The stored form: only what is set; None when nothing is."""
        out: dict[str, Any] = {}
        if self.token_limits:
            out["token_limits"] = dict(sorted(self.token_limits.items()))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "token_limits" and value is not None:
                out[f.name] = value
        return out or None

    @classmethod
    def from_json(cls, data: Any) -> ProjectSettings:
        if not isinstance(data, dict):
            return cls()
        limits = data.get("token_limits")
        return cls(
            token_limits={str(k): int(v) for k, v in limits.items()}
            if isinstance(limits, dict)
            else {},
            max_active_batches=_int_or_none(data.get("max_active_batches")),
            weight=_float_or_none(data.get("weight")),
            realtime_rpm=_float_or_none(data.get("realtime_rpm")),
            realtime_tpm=_float_or_none(data.get("realtime_tpm")),
        )

    def with_token_limit(self, model: str, limit: int | None) -> ProjectSettings:
        """A copy with the model's limit set (None: removed)."""
        limits = dict(self.token_limits)
        if limit is None:
            limits.pop(model, None)
        else:
            limits[model] = limit
        return replace(self, token_limits=limits)


@dataclass(frozen=True, slots=True)
class ProjectLoad:
    """A project's live figures: unfinished batches, and their enqueued tokens per model."""

    active_batches: int = 0
    enqueued_tokens: Mapping[str, int] = field(default_factory=dict)


def token_limit_message(model: str, project: str, limit: int) -> str:
    """OpenAI's words for a batch over the enqueued-token limit, with the project for the
    organization."""
    return (
        f"Enqueued token limit reached for {model} in project {project}. "
        f"Limit: {limit:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )


def active_batch_message(project: str, limit: int) -> str:
    return (
        f"Active batch limit reached in project {project}. Limit: {limit:,} active batches. "
        "Please try again once some in_progress batches have been completed."
    )


TOKEN_LIMIT_CODE = "token_limit_exceeded"
ACTIVE_BATCH_CODE = "active_batch_limit_exceeded"


def over_limit(enqueued: int, adding: int, limit: int | None) -> bool:
    """Whether `adding` tokens to `enqueued` ones passes `limit` (None: no limit)."""
    return limit is not None and enqueued + adding > limit


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
