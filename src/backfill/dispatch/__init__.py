"""Dispatch: per-model concurrency windows and retries between the worker and the engines."""

from backfill.dispatch.dispatcher import Dispatcher, DispatchStats, Outcome
from backfill.dispatch.window import Window

__all__ = ["DispatchStats", "Dispatcher", "Outcome", "Window"]
