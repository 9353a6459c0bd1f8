"""Engines: take an endpoint and a request body, return a status code and a body."""

from backfill.engines.base import Engine, EngineReply

__all__ = ["Engine", "EngineReply"]
