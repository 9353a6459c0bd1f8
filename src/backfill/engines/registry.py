"""Engine kinds by name: the composition root turns `ModelConfig`s into engines here.

Kept tiny on purpose: a dict from `kind` to a constructor. The in-process engines
(`transformers`, `embeddings`) are imported inside their constructor, and they import torch and
transformers only in `start()`, so a deployment that only forwards to HTTP upstreams never
imports either.

`default_models()` is what a server with no configured model serves: the packaged
all-MiniLM-L6-v2 as `all-MiniLM-L6-v2` when it (and torch) is installed, else nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from backfill.engines.base import Engine
from backfill.engines.openai import OpenAIEngine
from backfill.errors import InvalidRequest
from backfill.settings import ModelConfig

EngineFactory = Callable[[ModelConfig], Engine]


def _transformers(config: ModelConfig) -> Engine:
    from backfill.engines.transformers_engine import TransformersEngine

    return TransformersEngine(config)


def _embeddings(config: ModelConfig) -> Engine:
    from backfill.engines.embeddings import EmbeddingsEngine

    return EmbeddingsEngine(config)


ENGINE_KINDS: dict[str, EngineFactory] = {
    "openai": OpenAIEngine,
    "transformers": _transformers,
    "embeddings": _embeddings,
}


def default_models() -> list[ModelConfig]:
    """The packaged embeddings model, when installed; no network, no GPU needed."""
    from backfill.engines.embeddings import PACKAGED_NAME, default_models_available

    if not default_models_available():
        return []
    return [ModelConfig(name=PACKAGED_NAME, kind="embeddings")]


def build_engine(config: ModelConfig) -> Engine:
    """One engine for one model; unknown kinds are a configuration error."""
    factory = ENGINE_KINDS.get(config.kind)
    if factory is None:
        known = ", ".join(sorted(ENGINE_KINDS))
        raise InvalidRequest(
            f"model {config.name!r}: unknown engine kind {config.kind!r} (known kinds: {known})",
            param="kind",
            code="unknown_engine_kind",
        )
    try:
        return factory(config)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="models", code="invalid_model_config") from exc


def build_engines(models: list[ModelConfig]) -> dict[str, Engine]:
    """Engines by public model name. Not started: call `await engine.start()` on your loop."""
    engines: dict[str, Engine] = {}
    for config in models:
        if config.name in engines:
            raise InvalidRequest(
                f"model {config.name!r} is configured twice", param="models", code="duplicate_model"
            )
        engines[config.name] = build_engine(config)
    return engines
