"""Streaming `multipart/form-data` uploads: the file part flows to the blob store as it arrives.

`request.form()` is not used: Starlette spools the file to a temporary file (or memory) and
only then hands it over, which doubles the disk traffic and the latency of a 100 MB upload.
Instead we drive python-multipart's push parser ourselves over `request.stream()`:

1. feed body chunks until the `file` part's headers are parsed, buffering the small text
   fields seen so far (the openai SDK sends `purpose` first, curl sends fields in the order
   given on its command line, so `purpose` may come before or after the file);
2. hand `file_chunks()` to `Blobs.put_stream`: it keeps feeding the parser and yields the file
   part's bytes, coalesced to ~1 MiB so the blob store sees few large writes instead of
   thousands of 64 KiB ones, until the file part ends;
3. feed the rest of the body (fields after the file) and check it ended properly.

The size limit is enforced in the parser callback, i.e. while streaming: the first byte over
the limit raises `PayloadTooLarge` inside the iterator, so `put_stream` aborts and leaves no
object behind. Text fields are capped (`MAX_FIELD_BYTES`, `MAX_FIELDS`) so a client cannot make
us buffer a large body outside the file part.

Memory use is bounded by one body chunk plus one coalesced piece plus what the blob store
buffers for its multipart upload, whatever the file size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from backfill.api.text import check_text, text_problem
from backfill.errors import InvalidRequest, PayloadTooLarge

FILE_FIELD = "file"
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
COALESCE_BYTES = 1 << 20
MIB = 1024 * 1024


def multipart_boundary(content_type: str | None) -> bytes:
    ctype, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest(
            "Uploads must be sent as multipart/form-data with a 'file' part and a 'purpose' field.",
            param="file",
            code="invalid_content_type",
        )
    return boundary


def too_large_message(limit: int, body_bytes: int | None = None) -> str:
    limit_text = f"{limit} bytes ({limit / MIB:.0f} MiB)" if limit >= MIB else f"{limit} bytes"
    if body_bytes is not None:
        return f"File is too large: the upload is {body_bytes} bytes; the limit is {limit_text}."
    return f"File is too large: it exceeds the limit of {limit_text}."


def _decode_header_text(raw: bytes) -> str:
    # Browsers and the SDK send raw UTF-8 in multipart headers; the parser hands us latin-1.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class MultipartUpload:
    """One streamed multipart body with a single file part named `file`."""

    def __init__(
        self,
        content_type: str | None,
        body: AsyncIterator[bytes],
        *,
        max_file_bytes: int,
        body_bytes: int | None = None,
    ) -> None:
        self._body = body
        self._max_file_bytes = max_file_bytes
        self._body_bytes = body_bytes
        self._parser = MultipartParser(
            multipart_boundary(content_type),
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )
        #: text fields, by name (the last value wins)
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_bytes = 0
        self.file_started = False
        self.file_finished = False
        self.ended = False
        self._exhausted = False
        self._pending: list[bytes] = []
        self._part_count = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_headers: dict[str, bytes] = {}
        self._part_name: str | None = None
        self._in_file = False
        self._field_value = bytearray()

    # -- driving ------------------------------------------------------------------------------

    async def read_until_file(self) -> None:
        """Parse until the file part starts (or the body ends)."""
        while not self.file_started and await self._feed_next():
            pass

    async def file_chunks(self) -> AsyncIterator[bytes]:
        """The file part's bytes, coalesced, feeding the parser as needed."""
        buffered: list[bytes] = []
        buffered_bytes = 0
        while True:
            if self._pending:
                for piece in self._pending:
                    buffered.append(piece)
                    buffered_bytes += len(piece)
                self._pending.clear()
            if buffered and (buffered_bytes >= COALESCE_BYTES or self.file_finished):
                yield buffered[0] if len(buffered) == 1 else b"".join(buffered)
                buffered = []
                buffered_bytes = 0
            if self.file_finished:
                return
            if not await self._feed_next():
                raise InvalidRequest(
                    "The multipart body ended in the middle of the file part.", param="file"
                )

    async def read_rest(self) -> None:
        """Parse whatever follows the file part and check the body ended properly."""
        while await self._feed_next():
            pass
        if not self.ended:
            raise InvalidRequest(
                "Malformed multipart body: the closing boundary is missing.",
                code="invalid_multipart",
            )

    async def _feed_next(self) -> bool:
        if self._exhausted:
            return False
        while True:
            chunk = await anext(self._body, None)
            if chunk is None:
                self._exhausted = True
                return False
            if chunk:
                break
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise InvalidRequest(
                f"Malformed multipart body: {exc}", code="invalid_multipart"
            ) from exc
        return True

    # -- parser callbacks ---------------------------------------------------------------------

    def _on_part_begin(self) -> None:
        self._part_count += 1
        if self._part_count > MAX_FIELDS:
            raise InvalidRequest(f"Too many form fields (at most {MAX_FIELDS}).")
        self._part_headers = {}
        self._part_name = None
        self._in_file = False
        self._field_value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header_field.decode("latin-1").strip().lower()
        self._part_headers[name] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _on_headers_finished(self) -> None:
        disposition = self._part_headers.get("content-disposition", b"")
        _, options = parse_options_header(disposition.decode("latin-1"))
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest(
                "Malformed multipart body: a part has no name.", code="invalid_multipart"
            )
        self._part_name = _decode_header_text(name)
        if self._part_name != FILE_FIELD:
            return
        if self.file_started:
            raise InvalidRequest("Only one 'file' part may be uploaded.", param="file")
        self.file_started = True
        self._in_file = True
        raw = options.get(b"filename")
        filename = _decode_header_text(raw) if raw is not None else ""
        # Keep only the last path component: some clients send full local paths.
        filename = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
        problem = text_problem(filename)
        if problem is not None:
            raise InvalidRequest(
                f"Invalid filename: {problem}.", param="file", code="invalid_value"
            )
        self.filename = filename or "file"

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            n = end - start
            self.file_bytes += n
            if self.file_bytes > self._max_file_bytes:
                raise PayloadTooLarge(
                    too_large_message(self._max_file_bytes, self._body_bytes), param="file"
                )
            self._pending.append(data if n == len(data) else data[start:end])
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise InvalidRequest(
                f"Form field {self._part_name!r} is too large (at most {MAX_FIELD_BYTES} bytes).",
                param=self._part_name,
            )

    def _on_part_end(self) -> None:
        if self._in_file:
            self.file_finished = True
            self._in_file = False
            return
        if self._part_name is None:
            return
        try:
            value = self._field_value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"Form field {self._part_name!r} is not valid UTF-8.", param=self._part_name
            ) from exc
        self.fields[self._part_name] = check_text(value, self._part_name)

    def _on_end(self) -> None:
        self.ended = True
