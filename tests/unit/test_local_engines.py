"""Pure parts of the in-process engines and their configuration (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.engines.transformers_engine import (
    context_error,
    cut_at_stop,
    parse_sampling,
)
from backfill.errors import InvalidRequest
from backfill.settings import ModelConfig, build_settings, parse_model_spec

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"


def test_model_specs() -> None:
    up = parse_model_spec("m=http://h:8000/v1#real")
    assert (up.kind, up.url, up.upstream_name) == ("openai", "http://h:8000/v1", "real")
    assert "/v1/embeddings" in up.endpoints
    tr = parse_model_spec("tiny=transformers:/models/tiny")
    assert (tr.kind, tr.path) == ("transformers", "/models/tiny")
    assert tr.endpoints == [CHAT, COMPLETIONS, RESPONSES]
    em = parse_model_spec("e=embeddings:")
    assert (em.kind, em.path, em.endpoints) == ("embeddings", None, ["/v1/embeddings"])
    # a URL with a port is still an upstream, not a kind
    assert parse_model_spec("x=http://localhost:9000").kind == "openai"


def test_toml_in_process_models(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        '[models.tiny]\nkind = "transformers"\npath = "/m/tiny"\noptions = { max_n = 4 }\n'
        '[models.up]\nurl = "http://h/v1"\n'
    )
    models = {m.name: m for m in build_settings(cfg).models}
    assert models["tiny"].options == {"max_n": 4}
    assert models["tiny"].endpoints == [CHAT, COMPLETIONS, RESPONSES]
    assert models["up"].kind == "openai"
    with pytest.raises(ValueError, match="needs a url"):
        ModelConfig(name="x")


def test_sampling_parameters() -> None:
    s = parse_sampling({"max_completion_tokens": 9, "temperature": 0, "seed": 3, "n": 2}, CHAT, 16)
    assert (s.max_tokens, s.temperature, s.seed, s.n) == (9, 0.0, 3, 2)
    assert parse_sampling({}, CHAT, 16).max_tokens is None  # up to the context
    assert parse_sampling({}, COMPLETIONS, 16).max_tokens == 16  # legacy default
    assert parse_sampling({"stop": "x"}, CHAT, 16).stop == ["x"]
    for bad in (
        {"n": 0},
        {"n": 17},
        {"temperature": 3},
        {"max_tokens": 0},
        {"logprobs": True},
        {"frequency_penalty": 0.5},
        {"stop": ["a", "b", "c", "d", "e"]},
    ):
        with pytest.raises(InvalidRequest):
            parse_sampling(bad, CHAT, 16)
    assert parse_sampling({"frequency_penalty": 0, "logprobs": False}, CHAT, 16).n == 1


def test_context_and_stop_helpers() -> None:
    assert context_error(10, 118, 128) is None
    assert context_error(10, 119, 128) is not None
    assert context_error(127, None, 128) is None
    assert context_error(128, None, 128) is not None
    assert cut_at_stop("hello world foo", ["foo", "world"]) == "hello "
    assert cut_at_stop("hello", ["x"]) is None


def test_endpoint_defaults_and_declared_endpoints() -> None:
    up = parse_model_spec("m=http://h:8000/v1")
    assert up.endpoints == [CHAT, COMPLETIONS, "/v1/embeddings", RESPONSES]
    assert "/v1/moderations" not in up.endpoints  # only where the config declares it
    mod = ModelConfig(name="mod", url="http://h/v1", endpoints=["/v1/moderations"])
    assert mod.endpoints == ["/v1/moderations"]
    with pytest.raises(ValueError, match="unknown endpoints"):
        ModelConfig(name="x", url="http://h/v1", endpoints=["/v1/images/generations"])
