"""Record formats of the Kafka stream processor: input fragments, outputs, dead letters, state snapshots.

Every value is a map with a schema version ``v``, msgpack or JSON (the same fields; inputs may use either,
told apart by their first byte). Keys are stream ids (UTF-8). See docs/kafka.md.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

SCHEMA_VERSION = 1
ACTIONS = ("append", "end")

# Dead-letter reasons (the ``reason`` field of a dead-letter record).
NOT_MSGPACK = "not_msgpack"
BAD_JSON = "bad_json"
BAD_SCHEMA = "bad_schema"
SCHEMA_VERSION_MISMATCH = "schema_version"
INVALID_UTF8 = "invalid_utf8"
FRAGMENT_TOO_LARGE = "fragment_too_large"
UNKNOWN_ACTION = "unknown_action"
MISSING_KEY = "missing_key"
BAD_GENERATION = "bad_generation_request"
PROCESSING_ERROR = "processing_error"  # a valid record whose processing raised (see processing.py)
DEAD_LETTER_REASONS = (
    NOT_MSGPACK, BAD_JSON, BAD_SCHEMA, SCHEMA_VERSION_MISMATCH, INVALID_UTF8, FRAGMENT_TOO_LARGE, UNKNOWN_ACTION,
    MISSING_KEY, BAD_GENERATION, PROCESSING_ERROR,
)


class BadInput(ValueError):
    """An input record that cannot be processed; it goes to the dead-letter topic."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class GenerationRequest:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop:
            out["stop"] = list(self.stop)
        return out


@dataclass(frozen=True)
class Fragment:
    """A valid input record."""

    stream: str
    text: str
    end: bool = False
    ts_ms: float | None = None
    generate: GenerationRequest | None = None
    final: bool = True  # False: an interim hypothesis (``is_final: false``), revised by later fragments


# ------------------------------------------------------------------------------------------------- input
def encode_input(
    text: str,
    *,
    end: bool = False,
    ts_ms: float | None = None,
    generate: GenerationRequest | dict[str, Any] | None = None,
    action: str | None = None,
    is_final: bool | None = None,
) -> bytes:
    """The value of an input record (what a producer sends; the key is the stream id as UTF-8)."""
    value: dict[str, Any] = {"v": SCHEMA_VERSION, "text": text}
    if end:
        value["end"] = True
    if is_final is not None:
        value["is_final"] = is_final
    if action is not None:
        value["action"] = action
    if ts_ms is not None:
        value["ts"] = ts_ms
    if generate is not None:
        value["generate"] = generate.to_dict() if isinstance(generate, GenerationRequest) else dict(generate)
    return msgpack.packb(value, use_bin_type=True)


def parse_input(
    key: bytes | None, value: bytes | None, *, max_fragment_chars: int, max_generate_tokens: int
) -> Fragment:
    """Validate one input record; raises :class:`BadInput` with a dead-letter reason."""
    stream = _parse_key(key)
    obj = _unpack_map(value)
    version = obj.get("v")
    if version != SCHEMA_VERSION:
        raise BadInput(SCHEMA_VERSION_MISMATCH, f"schema version {version!r}, this consumer reads {SCHEMA_VERSION}")
    text = _text_field(obj.get("text", ""))
    if len(text) > max_fragment_chars:
        raise BadInput(FRAGMENT_TOO_LARGE, f"{len(text)} characters > max_fragment_chars={max_fragment_chars}")
    end = _end_flag(obj)
    ts = obj.get("ts")
    if ts is not None and (not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts)):
        raise BadInput(BAD_SCHEMA, f"ts must be a number (epoch ms), got {type(ts).__name__}")
    generate = _generation(obj.get("generate"), max_generate_tokens)
    final = _final_flag(obj, end, generate)
    return Fragment(stream, text, end, float(ts) if ts is not None else None, generate, final)


def _final_flag(obj: dict[str, Any], end: bool, generate: GenerationRequest | None) -> bool:
    final = obj.get("is_final", True)
    if not isinstance(final, bool):
        raise BadInput(BAD_SCHEMA, f"is_final must be a boolean, got {type(final).__name__}")
    if not final and (end or generate is not None):
        raise BadInput(BAD_SCHEMA, "an interim fragment (is_final false) cannot end its stream or ask for "
                                   "generation: send those with the final text")
    return final


def _parse_key(key: bytes | None) -> str:
    if not key:
        raise BadInput(MISSING_KEY, "record has no key (the key is the stream id)")
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(INVALID_UTF8, f"key is not UTF-8: {exc}") from None


def _unpack_map(value: bytes | None) -> dict[str, Any]:
    if value is None:
        raise BadInput(NOT_MSGPACK, "record has no value")
    if _looks_like_json(value):
        return _json_map(value)
    try:
        obj = msgpack.unpackb(value, raw=False, strict_map_key=False)
    except UnicodeDecodeError as exc:
        raise BadInput(INVALID_UTF8, f"a string in the value is not UTF-8: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise BadInput(NOT_MSGPACK, f"value is not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise BadInput(BAD_SCHEMA, f"value must be a msgpack map, got {type(obj).__name__}")
    return obj


def _looks_like_json(value: bytes) -> bool:
    """A JSON object starts with ``{`` (after whitespace); in msgpack those bytes are small integers, never a
    map, so a valid input of either encoding is never mistaken for the other."""
    return bytes(value[:64]).lstrip(b" \t\r\n")[:1] == b"{"


def _json_map(value: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(value).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadInput(INVALID_UTF8, f"JSON value is not UTF-8: {exc}") from None
    except ValueError as exc:
        raise BadInput(BAD_JSON, f"value is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadInput(BAD_SCHEMA, f"value must be a map, got {type(obj).__name__}")
    return obj


def encode_input_json(text: str, **fields: Any) -> bytes:
    """The JSON form of an input value (same fields as :func:`encode_input`)."""
    return json.dumps(msgpack.unpackb(encode_input(text, **fields), raw=False)).encode()


def _text_field(text: Any) -> str:
    if isinstance(text, bytes):  # producers that send bin: accept when it is UTF-8
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(INVALID_UTF8, f"text is not UTF-8: {exc}") from None
    if not isinstance(text, str):
        raise BadInput(BAD_SCHEMA, f"text must be a string, got {type(text).__name__}")
    return text


def _end_flag(obj: dict[str, Any]) -> bool:
    end = obj.get("end", False)
    if not isinstance(end, bool):
        raise BadInput(BAD_SCHEMA, f"end must be a boolean, got {type(end).__name__}")
    action = obj.get("action", "append")
    if action not in ACTIONS:
        raise BadInput(UNKNOWN_ACTION, f"unknown stream action {action!r}; known: {', '.join(ACTIONS)}")
    return end or action == "end"


def _generation(spec: Any, max_tokens_limit: int) -> GenerationRequest | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise BadInput(BAD_GENERATION, f"generate must be a map, got {type(spec).__name__}")
    try:
        n = spec.get("max_tokens", 16)
        temperature = float(spec.get("temperature", 1.0))
        top_p = float(spec.get("top_p", 1.0))
        seed = spec.get("seed")
        stop = spec.get("stop", [])
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_tokens_limit:
            raise ValueError(f"max_tokens must be an integer in [1, {max_tokens_limit}]")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError("temperature must be >= 0")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError("seed must be a non-negative integer")
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a list of strings")
    except (TypeError, ValueError) as exc:
        raise BadInput(BAD_GENERATION, str(exc)) from None
    return GenerationRequest(n, temperature, top_p, seed, tuple(stop))


# ------------------------------------------------------------------------------------------------- output
@dataclass
class TokenOut:
    id: int
    text: str
    start: int
    end: int
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "start": self.start, "end": self.end, "tags": self.tags}


# Fields whose values depend on timing, not on the input: duplicates may differ only in these.
TIMING_FIELDS = ("latency_ms",)


def encode_output(
    *,
    stream: str,
    partition: int,
    offset: int,
    tokens: list[TokenOut],
    cats: dict[str, dict[str, float]] | None,
    generated: str | None,
    end: bool,
    held_back: int,
    fingerprint: str,
    latency_ms: float,
    restored: str | None = None,
    is_final: bool = True,
) -> bytes:
    value = {
        "v": SCHEMA_VERSION,
        "stream": stream,
        "partition": partition,
        "offset": offset,
        "tokens": [t.to_dict() for t in tokens],
        "cats": cats,
        "generated": generated,
        "end": end,
        "held_back": held_back,
        "restored": restored,
        "is_final": is_final,
        "fingerprint": fingerprint,
        "latency_ms": round(latency_ms, 3),
    }
    return msgpack.packb(value, use_bin_type=True)


def decode_output(value: bytes) -> dict[str, Any]:
    """An output value, msgpack or JSON."""
    if _looks_like_json(value):
        return json.loads(value)
    return msgpack.unpackb(value, raw=False)


def without_timing(output: dict[str, Any]) -> dict[str, Any]:
    """An output value without the fields that legitimately differ between duplicates."""
    return {k: v for k, v in output.items() if k not in TIMING_FIELDS}


# ------------------------------------------------------------------------------------------------- dead letters
def encode_dead_letter(
    *, reason: str, detail: str, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
    timestamp_ms: int | None,
) -> bytes:
    return msgpack.packb(
        {
            "v": SCHEMA_VERSION,
            "reason": reason,
            "detail": detail,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "key": key,
            "value": value,
            "timestamp_ms": timestamp_ms,
        },
        use_bin_type=True,
    )


def decode_dead_letter(value: bytes) -> dict[str, Any]:
    """A dead letter, msgpack or JSON (whose ``key`` and ``value`` are base64: decoded back to bytes here)."""
    if not _looks_like_json(value):
        return msgpack.unpackb(value, raw=False)
    letter = json.loads(value)
    for name in ("key", "value"):
        if isinstance(letter.get(name), str):
            letter[name] = base64.b64decode(letter[name])
    return letter
