"""What goes on the wire besides the value schema: record headers kept from input to output, and the output
encoding (msgpack or JSON).

Headers: every header of an input record (W3C ``traceparent``/``tracestate`` and user headers alike) is copied
to its output and to its dead letter, in order, except ``content-type``, which describes the input's own
encoding (outputs carry their own ``content-type`` when they are JSON).

The output encoding is applied where records are sent (:meth:`OutputCodec.transform`), so the processing code
encodes every output once, as msgpack; JSON outputs are re-encoded from it (same fields, same schema; the
bytes of a dead letter's ``key`` and ``value`` become base64 strings).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

import msgpack

CONTENT_TYPE = "content-type"
JSON_TYPE = b"application/json"
MSGPACK_TYPE = b"application/msgpack"
OUTPUT_FORMATS = ("msgpack", "json")
MAX_PENDING_HEADERS = 200_000  # inputs with headers whose output has not been sent yet (bounded memory)

Headers = list[tuple[str, bytes]]


def header_items(rec: Any) -> Headers:
    """The headers of an input record to keep on its output or dead letter."""
    return [(k, bytes(v or b"")) for k, v in (getattr(rec, "headers", None) or []) if k.lower() != CONTENT_TYPE]


class OutputCodec:
    """Headers remembered per input record until its output is sent, and the output encoding."""

    def __init__(self, output_format: str, output_topic: str, dead_letter_topic: str) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {output_format!r}")
        self.json = output_format == "json"
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self._pending: dict[tuple[int, int], Headers] = {}

    def note_inputs(self, partition: int, records: Iterable[Any]) -> None:
        for rec in records:
            if getattr(rec, "headers", None):
                kept = header_items(rec)
                if kept:
                    self._pending[(partition, rec.offset)] = kept
        while len(self._pending) > MAX_PENDING_HEADERS:
            self._pending.pop(next(iter(self._pending)))

    def forget(self, partition: int) -> None:
        for key in [k for k in self._pending if k[0] == partition]:
            del self._pending[key]

    def transform(self, topic: str, value: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        """The value and headers to send for a value encoded as msgpack by the processing code."""
        if topic == self.output_topic and (self._pending or self.json):
            obj = msgpack.unpackb(value, raw=False)
            kept = self._pending.pop((obj["partition"], obj["offset"]), None)
            headers = list(kept) if kept else headers
            if self.json:
                value = to_json(obj)
        elif topic == self.dead_letter_topic and self.json:
            value = to_json(msgpack.unpackb(value, raw=False))
        if self.json and topic in (self.output_topic, self.dead_letter_topic):
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


def is_json(value: bytes | None) -> bool:
    """JSON or msgpack? A JSON object starts with ``{`` (after whitespace); those bytes are never a msgpack map
    (in msgpack they are small integers), so the two encodings are told apart without ambiguity."""
    return bool(value) and value.lstrip(b" \t\r\n")[:1] == b"{"
