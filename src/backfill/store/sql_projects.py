"""Project settings and quotas in the SQL store (`domain/projects.py`).

The settings are one JSON column on the project's row. The two quota checks run inside the
transaction of the write they guard (`check_active_batches` in `insert_batch`,
`check_token_limit` in `start_batch`), after locking the project's row on PostgreSQL
(`SELECT ... FOR UPDATE`): two batches of one project starting at once take turns, and the
second one's sum (a new snapshot per statement under READ COMMITTED) sees the first one's
tokens. SQLite needs no lock: writing transactions start with `BEGIN IMMEDIATE`, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, func, select, update

from backfill.domain.projects import (
    ACTIVE_BATCH_CODE,
    TOKEN_LIMIT_CODE,
    ProjectLoad,
    ProjectSettings,
    active_batch_message,
    over_limit,
    token_limit_message,
)
from backfill.domain.records import Project
from backfill.domain.statuses import TERMINAL
from backfill.errors import QuotaExceeded
from backfill.store.schema import batches, projects

T = TypeVar("T")

_TERMINAL = [s.value for s in TERMINAL]


def _locked_project(conn: Connection, project_id: str) -> Any:
    query = select(projects.c.name, projects.c.settings).where(projects.c.id == project_id)
    return conn.execute(query.with_for_update()).first()


def check_active_batches(conn: Connection, project_id: str) -> None:
    """Raise `QuotaExceeded` if the project already has its `max_active_batches` unfinished
    batches (in the caller's transaction, before its insert)."""
    settings = conn.execute(select(projects.c.settings).where(projects.c.id == project_id))
    first = settings.first()
    if first is None or ProjectSettings.from_json(first.settings).max_active_batches is None:
        return  # no cap: nothing to lock (creates of a project without one never wait)
    row = _locked_project(conn, project_id)  # the cap, read again under the row lock
    if row is None:
        return
    cap = ProjectSettings.from_json(row.settings).max_active_batches
    if cap is None:
        return
    active = conn.execute(
        select(func.count())
        .select_from(batches)
        .where(batches.c.project_id == project_id, batches.c.status.not_in(_TERMINAL))
    ).scalar_one()
    if int(active) >= cap:
        raise QuotaExceeded(active_batch_message(row.name, cap), code=ACTIVE_BATCH_CODE)


def check_token_limit(
    conn: Connection, project_id: str, batch_id: str, model: str | None, adding: int
) -> None:
    """Raise `QuotaExceeded` if `adding` tokens for `model` take the project over its limit
    (in the caller's transaction, before it starts the batch)."""
    row = _locked_project(conn, project_id)
    if row is None or model is None:
        return
    limit = ProjectSettings.from_json(row.settings).token_limits.get(model)
    if limit is None:
        return
    enqueued = conn.execute(
        select(func.coalesce(func.sum(batches.c.enqueued_tokens), 0)).where(
            batches.c.project_id == project_id,
            batches.c.model == model,
            batches.c.status.not_in(_TERMINAL),
            batches.c.id != batch_id,
        )
    ).scalar_one()
    if over_limit(int(enqueued), adding, limit):
        raise QuotaExceeded(token_limit_message(model, row.name, limit), code=TOKEN_LIMIT_CODE)


class SqlProjectsMixin:
    def _run(self, work: Callable[[Connection], T], *, write: bool = True) -> T:
        raise NotImplementedError

    def project_settings(self, project_id: str) -> ProjectSettings | None:
        query = select(projects.c.settings).where(projects.c.id == project_id)
        row = self._run(lambda conn: conn.execute(query).first(), write=False)
        return None if row is None else ProjectSettings.from_json(row.settings)

    def set_project_settings(self, name: str, settings: ProjectSettings) -> Project | None:
        def work(conn: Connection) -> Project | None:
            conn.execute(
                update(projects).where(projects.c.name == name).values(settings=settings.to_json())
            )
            row = conn.execute(select(projects.c.id).where(projects.c.name == name)).first()
            return None if row is None else Project(row.id, name)

        return self._run(work)

    def projects(self) -> list[tuple[Project, ProjectSettings]]:
        query = select(projects.c.id, projects.c.name, projects.c.settings).order_by(
            projects.c.name
        )
        rows = self._run(lambda conn: conn.execute(query).all(), write=False)
        return [(Project(r.id, r.name), ProjectSettings.from_json(r.settings)) for r in rows]

    def project_load(self, project_id: str) -> ProjectLoad:
        query = (
            select(
                batches.c.model,
                func.count(),
                func.coalesce(func.sum(batches.c.enqueued_tokens), 0),
            )
            .where(batches.c.project_id == project_id, batches.c.status.not_in(_TERMINAL))
            .group_by(batches.c.model)
        )
        rows = self._run(lambda conn: conn.execute(query).all(), write=False)
        return ProjectLoad(
            active_batches=sum(int(r[1]) for r in rows),
            enqueued_tokens={r[0]: int(r[2]) for r in rows if r[0] is not None and r[2]},
        )
