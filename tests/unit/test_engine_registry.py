"""Engine kinds come from entry points: the built-ins and a third party's alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from backfill.engines.openai import OpenAIEngine
from backfill.engines.registry import build_engine, engine_kinds
from backfill.errors import InvalidRequest
from backfill.settings import ModelConfig

FAKE_ENGINE = """
class EchoEngine:
    endpoints = frozenset({"/v1/chat/completions"})

    def __init__(self, config):
        self.model = config.name
        self.config = config

    async def start(self): ...
    async def close(self): ...
"""


def test_the_built_ins_are_registered_as_entry_points() -> None:
    assert {"openai", "transformers", "embeddings"} <= set(engine_kinds())
    engine = build_engine(ModelConfig(name="m", url="http://127.0.0.1:9/v1"))
    assert isinstance(engine, OpenAIEngine)


def test_a_third_party_package_adds_a_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution (its dist-info on sys.path) that declares an entry point in
    the group: no change to backfill."""
    (tmp_path / "third_party_engine.py").write_text(FAKE_ENGINE)
    info = tmp_path / "third_party_engine-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: third-party-engine\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[backfill.engines]\necho = third_party_engine:EchoEngine\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "echo" in engine_kinds()
    engine = build_engine(ModelConfig(name="mine", kind="echo", url="x"))
    assert type(engine).__name__ == "EchoEngine" and engine.model == "mine"


def test_an_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(InvalidRequest) as info:
        build_engine(ModelConfig(name="m", kind="nope", url="x"))
    assert info.value.code == "unknown_engine_kind"
    assert "openai" in info.value.message
