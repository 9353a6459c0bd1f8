"""Engine kinds by name: the composition root turns `ModelConfig`s into engines here.

Kept tiny on purpose: a dict from `kind` to a constructor. In-process engines (transformers,
embeddings) will register here too, imported lazily inside their constructor so that torch is
never imported by a deployment that only forwards to HTTP upstreams.
"""

from __future__ import annotations

from collections.abc import Callable

from backfill.engines.base import Engine
from backfill.engines.openai import OpenAIEngine
from backfill.errors import InvalidRequest
from backfill.settings import ModelConfig

EngineFactory = Callable[[ModelConfig], Engine]

ENGINE_KINDS: dict[str, EngineFactory] = {
    "openai": OpenAIEngine,
}


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
    return factory(config)


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
