"""`backfill usage [--since 7d] [--until ...] [--by project,model] [--json]`: the usage ledger
as a table, read from the store directly (like `keys list`), while a server runs or not.

One row per group (`--by`: any of `project`, `model`, `key`, `batch`; none: one row), with
requests, input / cached / output tokens, engine time, what the work cost and what it would
have cost at the real-time price, and a total. The figures are the store's own sums
(`Store.usage_totals`, the same call behind `/v1/organization/usage/...` and
`/v1/organization/costs`), over every endpoint: the API splits completions from embeddings,
this table does not. Cost columns are in each model's currency; a model without a price shows
`-`. Times: `--since`/`--until` take a duration back from now (`90m`, `36h`, `7d`), a date or
ISO time (UTC unless it says), or Unix seconds.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from backfill.cli.options import (
    DATA_DIR,
    Config,
    Database,
    DataDir,
    columns,
    command_settings,
    store_alone,
    when,
)
from backfill.domain.pricing import micros_to_amount
from backfill.domain.usage_reports import UsageTotal

app = typer.Typer()

#: `--by` names -> `Store.usage_totals` group keys
BY = {"project": "project_id", "model": "model", "key": "api_key_id", "batch": "batch"}
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: int) -> int:
    """A duration back from `now`, a date or ISO time (UTC unless given), or Unix seconds."""
    text = text.strip()
    if m := _DURATION.match(text):
        return now - int(m.group(1)) * _UNIT[m.group(2)]
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give a duration (90m, 36h, 7d), a date or ISO time, or Unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def parse_by(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if n not in BY]
    if bad:
        raise typer.BadParameter(f"{bad[0]!r}: choose from {', '.join(BY)}", param_hint="--by")
    return list(dict.fromkeys(names))


@dataclass
class Row:
    keys: dict[str, str]
    currency: str | None
    requests: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    engine_ms: int = 0
    cost: dict[str, int] = field(default_factory=dict)  # currency -> micros
    list_cost: dict[str, int] = field(default_factory=dict)

    def add(self, t: UsageTotal) -> None:
        self.requests += t.requests
        self.input_tokens += t.input_tokens
        self.cached_tokens += t.cached_tokens
        self.output_tokens += t.output_tokens
        self.engine_ms += t.engine_ms
        if t.currency is not None:
            self.cost[t.currency] = self.cost.get(t.currency, 0) + t.cost_micros
            self.list_cost[t.currency] = self.list_cost.get(t.currency, 0) + t.list_micros

    def figures(self) -> dict[str, Any]:
        return {
            **self.keys,
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "engine_seconds": round(self.engine_ms / 1000, 3),
            "cost": {c: micros_to_amount(m) for c, m in sorted(self.cost.items())},
            "realtime_cost": {c: micros_to_amount(m) for c, m in sorted(self.list_cost.items())},
        }


def _money(amounts: dict[str, int]) -> str:
    if not amounts:
        return "-"
    return " + ".join(f"{micros_to_amount(m):.6f} {c}".rstrip() for c, m in sorted(amounts.items()))


def rows_of(totals: list[UsageTotal], by: list[str], names: dict[str, str]) -> list[Row]:
    rows: dict[tuple[str, ...], Row] = {}
    for t in totals:
        keys: dict[str, str] = {}
        for name in by:
            value = getattr(t, BY[name])
            if name == "project":
                value = names.get(value, value)
            elif name == "batch":
                value = "batch" if value else "realtime"
            keys[name] = "-" if value is None else str(value)
        rows.setdefault(tuple(keys.values()), Row(keys, t.currency)).add(t)
    return [rows[k] for k in sorted(rows)]


def table(rows: list[Row], total: Row, by: list[str]) -> str:
    head = [n.upper() for n in by] + [
        "REQUESTS", "INPUT", "CACHED", "OUTPUT", "ENGINE_S", "COST", "REALTIME_COST",
    ]  # fmt: skip
    lines = [head]
    for row in [*rows, total]:
        lines.append(
            [
                *row.keys.values(),
                str(row.requests),
                str(row.input_tokens),
                str(row.cached_tokens),
                str(row.output_tokens),
                f"{row.engine_ms / 1000:.1f}",
                _money(row.cost),
                _money(row.list_cost),
            ]
        )
    return columns(lines)


@app.command("usage")
def usage(
    ctx: typer.Context,
    since: Annotated[
        str, typer.Option("--since", help="from: a duration back (7d), a date or Unix seconds")
    ] = "7d",
    until: Annotated[
        str | None, typer.Option("--until", help="to (exclusive), as --since", show_default="now")
    ] = None,
    by: Annotated[
        str | None,
        typer.Option("--by", help="group by any of project,model,key,batch", show_default="none"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    config: Config = None,
    data_dir: DataDir = DATA_DIR,
    database: Database = None,
) -> None:
    """Usage and cost: tokens, engine time, cost, real-time cost.

    Requests, input / cached / output tokens, engine seconds, cost and the real-time
    equivalent per group (--by), with a total, from the usage ledger.
    """
    now = int(time.time())
    start = parse_time(since, now)
    # to the end of the current second (--until is exclusive): work recorded just now counts
    end = now + 1 if until is None else parse_time(until, now)
    if end <= start:
        raise typer.BadParameter("--until must be after --since", param_hint="--until")
    groups = parse_by(by)
    store = store_alone(command_settings(ctx, config, data_dir, database))
    try:
        totals = store.usage_totals(
            start=start,
            end=end,
            width=end - start,  # one bucket: the whole range
            group_by=(*(BY[n] for n in groups), "currency"),
        )
        names = {p.id: p.name for p, _ in store.projects()} if "project" in groups else {}
    finally:
        store.close()
    rows = rows_of(totals, groups, names)
    total = Row({n: "TOTAL" if i == 0 else "" for i, n in enumerate(groups)}, None)
    for t in totals:
        total.add(t)
    if not groups:
        total.keys = {}
    if as_json:
        print(
            json.dumps(
                {
                    "start_time": start,
                    "end_time": end,
                    "by": groups,
                    "rows": [r.figures() for r in rows],
                    "total": total.figures(),
                },
                indent=2,
            )
        )
        return
    print(f"Usage from {when(start)} to {when(end)}")
    print(table(rows if groups else [], total, groups))


__all__ = ["app", "parse_by", "parse_time"]
