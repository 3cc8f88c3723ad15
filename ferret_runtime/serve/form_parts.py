"""The image parts of a ``multipart/form-data`` body, for ``ferret serve``'s /v1/detect.

Synchronous on purpose: python-multipart's parser is plain Python, and a body of near-miss
boundaries (``\\r\\n--BOUNDARY-`` over and over) costs it about 0.35 µs a byte (11 s for 30 MB,
measured), so the server runs this in a worker thread, never on its event loop. The rules are
Starlette's form parser's: a part with a ``filename`` is a file (named by it, else by its field
name), others are fields, at most ``max_parts`` of each.
"""

from __future__ import annotations

from typing import Any

from ..errors import FerretError


class FormError(FerretError):
    """A malformed multipart body (answered 400)."""


class TooManyParts(FormError):
    """More parts than the server takes (answered 413)."""

    def __init__(self, limit: int):
        super().__init__(f"Received more than {limit} multipart parts; expected at most {limit} (--max-parts)")


def file_parts(content_type: str, body: bytes, max_parts: int) -> list[tuple[str, bytes]]:
    """(name, bytes) of each file part, in order; FormError or TooManyParts says what is wrong."""
    try:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13 is imported as multipart
        from multipart.exceptions import FormParserError  # type: ignore[no-redef]
        from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise FormError("Received a multipart body without a boundary in its Content-Type; expected one")
    parts = _Parts(max_parts, parse_options_header)
    try:
        parser = MultipartParser(boundary, parts.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise FormError(f"Received a malformed multipart body ({e}); expected image file parts") from None
    return parts.files


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _Parts:
    """python-multipart's callbacks, collecting the file parts."""

    def __init__(self, max_parts: int, parse_options_header: Any):
        self.max_parts, self.parse_options = max_parts, parse_options_header
        self.files: list[tuple[str, bytes]] = []
        self.fields = 0
        self.begin()

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.data, "on_part_end": self.end}

    def begin(self) -> None:
        self.header, self.value, self.disposition = b"", b"", b""
        self.filename: str | None = None
        self.chunks: list[bytes] = []

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def header_end(self) -> None:
        if self.header.lower() == b"content-disposition":
            self.disposition = self.value
        self.header, self.value = b"", b""

    def headers_finished(self) -> None:
        options = self.parse_options(self.disposition)[1]
        if b"name" not in options:
            raise FormError('Received a multipart part without a name; expected Content-Disposition: form-data; '
                            'name="..."; filename="..."')
        if b"filename" in options:
            if len(self.files) >= self.max_parts:
                raise TooManyParts(self.max_parts)
            self.filename = _text(options[b"filename"]) or _text(options[b"name"])
        else:
            self.fields += 1
            if self.fields > self.max_parts:
                raise TooManyParts(self.max_parts)

    def data(self, data: bytes, start: int, end: int) -> None:
        if self.filename is not None:  # a field's value is not kept: only files are images
            self.chunks.append(data[start:end])

    def end(self) -> None:
        if self.filename is not None:
            self.files.append((self.filename, b"".join(self.chunks)))
