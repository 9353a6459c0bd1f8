"""Engine kinds by name: the composition root turns `ModelConfig`s into engines here.

Kinds are entry points of the group `backfill.engines` (name: the `kind` a model config gives;
value: a callable taking a `ModelConfig` and returning an `Engine`). The built-ins (`openai`,
`transformers`, `embeddings`) are registered in backfill's own `pyproject.toml` the same way, so
a third-party package adds a kind by declaring an entry point, without touching backfill:

    [project.entry-points."backfill.engines"]
    mykind = "my_package.engine:MyEngine"

A model of kind `openai` that names several `urls` is served by a `ReplicaSet`
(`engines/replicas.py`): one `OpenAIEngine` per replica behind the same interface.

An entry point is loaded only when a model asks for its kind, so a deployment that only forwards
to HTTP upstreams never imports the in-process engines (and those import torch and transformers
only in `start()`).

`default_models()` is what a server with no configured model serves, with `backfill[local]`:
the packaged all-MiniLM-L6-v2 as `all-MiniLM-L6-v2` for embeddings, and SmolLM2-135M-Instruct
as `SmolLM2-135M-Instruct` for chat and completions on the `transformers` engine (fetched and
converted once into a cache at the first start, see `engines/smollm2.py`; when that fails the
server starts without it). Without the extra: nothing. A settings object with a
`default_chat_model = False` field keeps the chat model out (embeddings only).
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
    """`settings`, serving the default models when none is configured (and that is on)."""
    if settings.models or not settings.default_model:
        return settings
    chat = settings.default_chat_model
    return settings.model_copy(update={"models": default_models(chat=chat)})


def default_models(*, chat: bool = True) -> list[ModelConfig]:
    """The packaged embeddings model and the default chat model, those that are available;
    no GPU, no model hub. The chat model is fetched and converted here at its first use."""
    from backfill.engines.embeddings import PACKAGED_NAME, default_models_available

    models = []
    if default_models_available():
        models.append(ModelConfig(name=PACKAGED_NAME, kind="embeddings"))
    if chat:
        from backfill.engines.smollm2 import default_chat_model

        config = default_chat_model()
        if config is not None:
            models.append(config)
    return models


def build_engine(config: ModelConfig) -> Engine:
    """One engine for one model; unknown kinds are a configuration error."""
    if config.kind == "openai" and len(config.upstream_urls) > 1:
        from backfill.engines.replicas import ReplicaSet

        return ReplicaSet(config)
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
