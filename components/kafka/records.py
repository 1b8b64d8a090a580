"""What goes on the wire besides the value schema: record headers kept from input to output, and the output
encoding (msgpack or JSON).

Headers: every header of an input record (W3C ``traceparent``/``tracestate`` and user headers alike) is copied
to its output and to its dead letter, in order, except ``content-type``, which describes the input's own
encoding (outputs carry their own ``content-type`` when they are JSON).

The processing code passes each output and dead letter its input's headers and encodes it once, as msgpack;
the output encoding is applied where records are sent (:meth:`OutputCodec.transform`): JSON outputs are
re-encoded from the msgpack (same fields, same schema; the bytes of a dead letter's ``key`` and ``value``
become base64 strings).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack

CONTENT_TYPE = "content-type"
JSON_TYPE = b"application/json"
MSGPACK_TYPE = b"application/msgpack"
OUTPUT_FORMATS = ("msgpack", "json")

Headers = list[tuple[str, bytes]]


def header_items(rec: Any) -> Headers:
    """The headers of an input record to keep on its output or dead letter."""
    return [(k, bytes(v or b"")) for k, v in (getattr(rec, "headers", None) or []) if k.lower() != CONTENT_TYPE]


class OutputCodec:
    """The output encoding: outputs and dead letters are encoded once as msgpack by the processing code and,
    for ``output_format = "json"``, re-encoded here as JSON (with a ``content-type`` header)."""

    def __init__(self, output_format: str, output_topic: str, dead_letter_topic: str) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {output_format!r}")
        self.json = output_format == "json"
        self.topics = (output_topic, dead_letter_topic)

    def transform(self, topic: str, value: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        """The value and headers to send for a msgpack value on ``topic``."""
        if self.json and topic in self.topics:
            value = to_json(msgpack.unpackb(value, raw=False))
            headers = [*(headers or []), (CONTENT_TYPE, JSON_TYPE)]
        return value, headers or None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def to_json(obj: Any) -> bytes:
    return json.dumps(_jsonable(obj), ensure_ascii=False, separators=(",", ":")).encode()

