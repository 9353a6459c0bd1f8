"""Lists: the SDK's auto-pagination walks every page; files honour `order` and `purpose`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from openai import BadRequestError, OpenAI
from openai.types import Batch, FileObject
from sdk_helpers import CHAT, chat_line, jsonl, upload, wait_batch


@pytest.fixture(scope="module")
def pager(new_project: Callable[[str], OpenAI]) -> OpenAI:
    return new_project("pager")


@pytest.fixture(scope="module")
def made(pager: OpenAI) -> tuple[list[FileObject], list[Batch]]:
    """7 input files and a batch on each, plus 2 files of another purpose, in creation order."""
    files: list[FileObject] = []
    batches: list[Batch] = []
    for i in range(7):
        file = upload(pager, jsonl([chat_line(f"p{i}", f"page {i}")]), name=f"in{i}.jsonl")
        files.append(file)
        batches.append(
            pager.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
        )
    for i in range(2):
        files.append(upload(pager, b'{"x": 1}\n', name=f"ft{i}.jsonl", purpose="fine-tune"))
    # let every batch finish so its output file exists before lists are compared
    return files, [wait_batch(pager, b.id) for b in batches]


def test_batches_auto_pagination_newest_first(
    pager: OpenAI, made: tuple[list[FileObject], list[Batch]]
) -> None:
    _, batches = made
    first = pager.batches.list(limit=2)
    assert len(first.data) == 2
    assert first.has_more is True
    walked = [b.id for b in pager.batches.list(limit=2)]
    assert walked == [b.id for b in reversed(batches)]
    assert len(set(walked)) == len(walked)


def test_batches_after_cursor(pager: OpenAI, made: tuple[list[FileObject], list[Batch]]) -> None:
    _, batches = made
    newest_first = [b.id for b in reversed(batches)]
    page = pager.batches.list(limit=3, after=newest_first[2])
    assert [b.id for b in page.data] == newest_first[3:6]
    assert page.has_more is True
    last = pager.batches.list(limit=3, after=newest_first[5])
    assert [b.id for b in last.data] == newest_first[6:]
    assert last.has_more is False


Made = tuple[list[FileObject], list[Batch]]


def test_default_limit_and_bounds(pager: OpenAI, made: Made) -> None:
    page = pager.batches.list()
    assert len(page.data) == 7
    assert page.has_more is False
    exact = pager.batches.list(limit=7)
    assert exact.has_more is False
    assert [b.id for b in exact.data] == [b.id for b in reversed(made[1])]
    assert pager.batches.list(limit=6).has_more is True
    for bad in (0, 101):
        with pytest.raises(BadRequestError) as info:
            pager.batches.list(limit=bad)
        assert info.value.status_code == 400


def test_files_order_and_purpose(pager: OpenAI, made: tuple[list[FileObject], list[Batch]]) -> None:
    files, batches = made
    inputs = [f.id for f in files[:7]]
    fine_tune = [f.id for f in files[7:]]
    outputs = [b.output_file_id for b in batches]
    assert all(b.status == "completed" for b in batches)

    assert [f.id for f in pager.files.list(purpose="batch", order="asc", limit=2)] == inputs
    assert [f.id for f in pager.files.list(purpose="batch", order="desc", limit=2)] == inputs[::-1]
    assert [f.id for f in pager.files.list(purpose="batch")] == inputs[::-1]  # desc by default
    assert [f.id for f in pager.files.list(purpose="fine-tune", order="asc")] == fine_tune
    by_output = pager.files.list(purpose="batch_output", order="asc")
    assert sorted(f.id for f in by_output) == sorted(o for o in outputs if o)
    assert len(by_output.data) == 7
    assert all(f.purpose == "batch_output" for f in by_output)

    listed = list(pager.files.list(order="asc", limit=3))
    everything = [f.id for f in listed]
    assert len(everything) == len(set(everything)) == 16
    assert [i for i in everything if i in inputs] == inputs
    # output files interleave with the inputs (a batch may finish before the next upload),
    # but the list is in creation order: times never go back, fine-tune files come last
    assert [f.created_at for f in listed] == sorted(f.created_at for f in listed)
    assert everything.index(fine_tune[0]) > everything.index(inputs[-1])
    assert everything.index(fine_tune[1]) > everything.index(fine_tune[0])
    newest_first = [f.id for f in pager.files.list(order="desc", limit=5)]
    assert newest_first == everything[::-1]

    page = pager.files.list(order="asc", limit=4)
    assert [f.id for f in page.data] == everything[:4]
    assert page.has_more is True
    after = pager.files.list(order="asc", limit=4, after=everything[3])
    assert [f.id for f in after.data] == everything[4:8]
    exact = pager.files.list(order="asc", limit=16)
    assert len(exact.data) == 16
    assert exact.has_more is False
    extra = exact.model_extra or {}
    assert (extra["first_id"], extra["last_id"]) == (everything[0], everything[-1])
    tail = pager.files.list(order="asc", limit=100, after=everything[11])
    assert [f.id for f in tail.data] == everything[12:]
    assert tail.has_more is False
