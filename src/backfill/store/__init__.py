"""Metadata store: projects, keys, files, batches, shards and segments behind one interface.

`open_store` is the one place a URL becomes a backend: `memory://` is the in-memory twin,
anything else (`sqlite:///path`, `postgresql://...`) is the SQL store. The SQL module (and so
SQLAlchemy) is imported only when it is chosen.
"""

from __future__ import annotations

from backfill.store.base import Page, Store

__all__ = ["Page", "Store", "open_store"]


def open_store(url: str | None, *, busy_timeout: float = 5.0) -> Store:
    """The store for `url`. Call `migrate()` on it before first use. A SQL store's calls give
    up with `StoreBusy` after waiting `busy_timeout` seconds for a lock or a connection."""
    if url is None or url == "":
        raise ValueError("a store URL is required (memory://, sqlite:///path, postgresql://...)")
    if url.startswith("memory://"):
        from backfill.store.memory import MemoryStore

        return MemoryStore()
    from backfill.store.sql import SqlStore

    return SqlStore(url, busy_timeout=busy_timeout)
