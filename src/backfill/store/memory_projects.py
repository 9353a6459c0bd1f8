"""Project settings and quotas in `MemoryStore`, the twin of `sql_projects.py`: settings by
project id, each started batch's enqueued tokens by batch id; the checks run under the store's
one lock (`_check_*` are for callers holding it), which serializes them as SQL's transactions
do."""

from __future__ import annotations

import threading
from typing import Any

from backfill.domain.projects import (
    ACTIVE_BATCH_CODE,
    TOKEN_LIMIT_CODE,
    ProjectLoad,
    ProjectSettings,
    active_batch_message,
    over_limit,
    token_limit_message,
)
from backfill.domain.records import BatchRecord, Project
from backfill.domain.statuses import TERMINAL
from backfill.errors import QuotaExceeded


class MemoryProjectsMixin:
    _lock: threading.Lock
    _projects: dict[str, Project]  # by name
    _batches: dict[str, Any]  # id -> memory.py's _StoredBatch (its `record`)

    def _init_projects(self) -> None:
        self._settings: dict[str, ProjectSettings] = {}  # by project id
        self._enqueued: dict[str, int] = {}  # batch id -> enqueued tokens (set at start)

    def _project_by_id(self, project_id: str) -> Project | None:
        return next((p for p in self._projects.values() if p.id == project_id), None)

    def _unfinished(self, project_id: str) -> list[BatchRecord]:
        return [
            b.record
            for b in self._batches.values()
            if b.record.project_id == project_id and b.record.status not in TERMINAL
        ]

    def _check_active_batches(self, project_id: str) -> None:
        project = self._project_by_id(project_id)
        cap = self._settings.get(project_id, ProjectSettings()).max_active_batches
        if project is None or cap is None:
            return
        if len(self._unfinished(project_id)) >= cap:
            raise QuotaExceeded(active_batch_message(project.name, cap), code=ACTIVE_BATCH_CODE)

    def _check_token_limit(
        self, project_id: str, batch_id: str, model: str | None, adding: int
    ) -> None:
        project = self._project_by_id(project_id)
        if project is None or model is None:
            return
        limit = self._settings.get(project_id, ProjectSettings()).token_limits.get(model)
        enqueued = sum(
            self._enqueued.get(b.id, 0)
            for b in self._unfinished(project_id)
            if b.model == model and b.id != batch_id
        )
        if limit is not None and over_limit(enqueued, adding, limit):
            raise QuotaExceeded(
                token_limit_message(model, project.name, limit), code=TOKEN_LIMIT_CODE
            )

    def project_settings(self, project_id: str) -> ProjectSettings | None:
        with self._lock:
            if self._project_by_id(project_id) is None:
                return None
            return self._settings.get(project_id, ProjectSettings())

    def set_project_settings(self, name: str, settings: ProjectSettings) -> Project | None:
        with self._lock:
            project = self._projects.get(name)
            if project is None:
                return None
            # stored as SQL stores it: through its JSON form
            self._settings[project.id] = ProjectSettings.from_json(settings.to_json())
            return project

    def projects(self) -> list[tuple[Project, ProjectSettings]]:
        with self._lock:
            return [
                (p, self._settings.get(p.id, ProjectSettings()))
                for p in sorted(self._projects.values(), key=lambda p: p.name)
            ]

    def project_load(self, project_id: str) -> ProjectLoad:
        with self._lock:
            unfinished = self._unfinished(project_id)
            tokens: dict[str, int] = {}
            for b in unfinished:
                n = self._enqueued.get(b.id, 0)
                if b.model is not None and n:
                    tokens[b.model] = tokens.get(b.model, 0) + n
            return ProjectLoad(active_batches=len(unfinished), enqueued_tokens=tokens)
