"""Metadata store: projects, keys, files, batches, shards and segments behind one interface."""

from backfill.store.base import Page, Store

__all__ = ["Page", "Store"]
