"""Engine kinds by name: the composition root turns `ModelConfig`s into engines here.

Kinds are entry points of the group `backfill.engines` (name: the `kind` a model config gives;
value: a callable taking a `ModelConfig` and returning an `Engine`). The built-ins (`openai`,
`transformers`, `embeddings`) are registered in backfill's own `pyproject.toml` the same way, so
a third-party package adds a kind by declaring an entry point, without touching backfill:

    [project.entry-points."backfill.engines"]
    mykind = "my_package.engine:MyEngine"

An entry point is loaded only when a model asks for its kind, so a deployment that only forwards
to HTTP upstreams never imports the in-process engines (and those import torch and transformers
only in `start()`).

`default_models()` is what a server with no configured model serves: the packaged
all-MiniLM-L6-v2 as `all-MiniLM-L6-v2` when it (and torch) is installed, else nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from backfill.engines.base import Engine
from backfill.errors import InvalidRequest
from backfill.settings import ModelConfig, Settings

EngineFactory = Callable[[ModelConfig], Engine]

#: the entry-point group engine kinds register in
GROUP = "backfill.engines"


def engine_kinds() -> dict[str, EntryPoint]:
    """Every registered engine kind (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def engine_factory(kind: str) -> EngineFactory | None:
    """The constructor registered for `kind` (loaded now), or None."""
    ep = engine_kinds().get(kind)
    if ep is None:
        return None
    factory: EngineFactory = ep.load()
    return factory


def with_default_models(settings: Settings) -> Settings:
    """`settings`, serving the packaged model when none is configured (and that is on)."""
    if settings.models or not settings.default_model:
        return settings
    return settings.model_copy(update={"models": default_models()})


def default_models() -> list[ModelConfig]:
    """The packaged embeddings model, when installed; no network, no GPU needed."""
    from backfill.engines.embeddings import PACKAGED_NAME, default_models_available

    if not default_models_available():
        return []
    return [ModelConfig(name=PACKAGED_NAME, kind="embeddings")]


def build_engine(config: ModelConfig) -> Engine:
    """One engine for one model; unknown kinds are a configuration error."""
    factory = engine_factory(config.kind)
    if factory is None:
        known = ", ".join(sorted(engine_kinds()))
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
