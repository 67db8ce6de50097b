"""Reading an upload without ever writing it anywhere: the body streamed into memory under a byte limit
and a time limit (whatever the Content-Length says, chunked or not), then the multipart form parsed in
memory with python-multipart's push parser. (Starlette's own form reader spools files over 1 MiB to a
temporary file, and counts bytes only after reading them all.)"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass


class UploadError(Exception):
    """A refused upload: `status` is the HTTP status to answer with, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytes


async def read_body(chunks, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body from an async iterator of chunks, or UploadError: 413 past `max_bytes` (stops
    reading at once), 408 when it has not all arrived within `timeout_s`."""
    buf = bytearray()

    async def pull():
        async for chunk in chunks:
            buf.extend(chunk)
            if len(buf) > max_bytes:
                raise UploadError(413, f"upload over the limit of {max_bytes:,} bytes")

    try:
        await asyncio.wait_for(pull(), timeout_s)
    except asyncio.TimeoutError:
        raise UploadError(408, f"the upload did not arrive within {timeout_s:g} s (a Content-Length longer "
                               "than the body?)") from None
    return bytes(buf)


def parse_multipart(body: bytes, content_type: str, max_parts: int = 4) -> list[Part]:
    """The parts of a multipart/form-data body, in memory. UploadError(400) for anything malformed."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary in its Content-Type")
    parts: list[dict] = []
    state = {"field": bytearray(), "value": bytearray(), "ended": False}

    def begin():
        if len(parts) >= max_parts:
            raise UploadError(400, f"more than {max_parts} parts in the form")
        parts.append({"headers": {}, "data": bytearray(), "complete": False})

    def header_field(data, start, end):
        state["field"] += data[start:end]

    def header_value(data, start, end):
        state["value"] += data[start:end]

    def header_end():
        parts[-1]["headers"][bytes(state["field"]).lower()] = bytes(state["value"])
        state["field"], state["value"] = bytearray(), bytearray()

    def part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    def part_end():
        parts[-1]["complete"] = True

    def end():
        state["ended"] = True

    callbacks = {"on_part_begin": begin, "on_header_field": header_field, "on_header_value": header_value,
                 "on_header_end": header_end, "on_part_data": part_data, "on_part_end": part_end,
                 "on_end": end}
    try:
        parser = MultipartParser(boundary, callbacks)  # refuses a boundary over 256 bytes (RFC 2046: 70)
        parser.write(body)
        parser.finalize()
    except UploadError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart raises several kinds for broken input
        raise UploadError(400, f"unreadable multipart form: {e}") from None
    if not state["ended"] or not all(p["complete"] for p in parts):
        raise UploadError(400, "the multipart form ends before its closing boundary (a truncated upload, "
                               "or a Content-Length shorter than the body?)")
    out = []
    for p in parts:
        _, disposition = parse_options_header(p["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        out.append(Part(name, filename.decode("utf-8", "replace") if filename is not None else None,
                        bytes(p["data"])))
    return out
