"""Kafka processor pieces that need no broker: record schemas, settings, fault rules, snapshot encoding."""

from __future__ import annotations

import msgpack
import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from rwkv_stream.components.kafka import schema  # noqa: E402
from rwkv_stream.components.kafka.config import ConsumerConfig, load_config  # noqa: E402
from rwkv_stream.components.kafka.faults import Faults, InjectedCommitFailure  # noqa: E402
from rwkv_stream.components.kafka.schema import BadInput, GenerationRequest, encode_input, parse_input  # noqa: E402
from rwkv_stream.components.kafka.state_store import SnapshotCodec, unpack_payload  # noqa: E402

LIMITS = {"max_fragment_chars": 100, "max_generate_tokens": 32}


def _reason(key: bytes | None, value: bytes | None) -> str:
    with pytest.raises(BadInput) as info:
        parse_input(key, value, **LIMITS)
    return info.value.reason


def test_valid_input_round_trip():
    value = encode_input("hello wor", end=True, ts_ms=1234.5, generate=GenerationRequest(5, 0.7, 0.9, seed=3,
                                                                                          stop=("\n",)))
    frag = parse_input(b"call-7", value, **LIMITS)
    assert frag.stream == "call-7" and frag.text == "hello wor" and frag.end and frag.ts_ms == 1234.5
    assert frag.generate == GenerationRequest(5, 0.7, 0.9, 3, ("\n",))
    assert parse_input(b"k", encode_input("x", action="end"), **LIMITS).end
    assert parse_input(b"k", msgpack.packb({"v": 1}), **LIMITS).text == ""
    assert parse_input(b"k", msgpack.packb({"v": 1, "text": "ünï".encode(), "extra": 1}), **LIMITS).text == "ünï"


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"k", b"\xc1\xff not msgpack", schema.NOT_MSGPACK),
        (b"k", None, schema.NOT_MSGPACK),
        (b"k", msgpack.packb([1, 2]), schema.BAD_SCHEMA),
        (b"k", msgpack.packb({"v": 2, "text": "x"}), schema.SCHEMA_VERSION_MISMATCH),
        (b"k", msgpack.packb({"text": "x"}), schema.SCHEMA_VERSION_MISMATCH),
        (b"k", msgpack.packb({"v": 1, "text": b"\xff\xfe"}, use_bin_type=False), schema.INVALID_UTF8),
        (b"k", msgpack.packb({"v": 1, "text": b"\xff\xfe"}, use_bin_type=True), schema.INVALID_UTF8),
        (b"\xff\xfek", encode_input("x"), schema.INVALID_UTF8),
        (b"k", encode_input("x" * 101), schema.FRAGMENT_TOO_LARGE),
        (b"k", encode_input("x", action="rewind"), schema.UNKNOWN_ACTION),
        (None, encode_input("x"), schema.MISSING_KEY),
        (b"k", msgpack.packb({"v": 1, "text": 5}), schema.BAD_SCHEMA),
        (b"k", msgpack.packb({"v": 1, "text": "x", "end": "yes"}), schema.BAD_SCHEMA),
        (b"k", msgpack.packb({"v": 1, "text": "x", "ts": "now"}), schema.BAD_SCHEMA),
        (b"k", encode_input("x", generate={"max_tokens": 0}), schema.BAD_GENERATION),
        (b"k", encode_input("x", generate={"max_tokens": 33}), schema.BAD_GENERATION),
        (b"k", encode_input("x", generate={"max_tokens": 3, "top_p": 0}), schema.BAD_GENERATION),
        (b"k", encode_input("x", generate={"max_tokens": 3, "stop": "."}), schema.BAD_GENERATION),
        (b"k", msgpack.packb({"v": 1, "text": "x", "generate": 7}), schema.BAD_GENERATION),
    ],
)
def test_bad_input_reasons(key, value, reason):
    assert _reason(key, value) == reason
    assert reason in schema.DEAD_LETTER_REASONS


def test_output_and_dead_letter_encoding():
    out = schema.encode_output(stream="s", partition=1, offset=9, tokens=[schema.TokenOut(4, "hi", 0, 2, {"t": "O"})],
                               cats={"c": {"a": 0.25}}, generated=None, end=False, held_back=3, fingerprint="f",
                               latency_ms=1.23456)
    value = schema.decode_output(out)
    assert value["tokens"] == [{"id": 4, "text": "hi", "start": 0, "end": 2, "tags": {"t": "O"}}]
    assert value["latency_ms"] == 1.235 and "latency_ms" not in schema.without_timing(value)
    dead = schema.decode_dead_letter(schema.encode_dead_letter(reason="r", detail="d", topic="t", partition=0,
                                                               offset=5, key=b"\xff", value=b"\x00", timestamp_ms=1))
    assert dead["key"] == b"\xff" and dead["value"] == b"\x00" and dead["reason"] == "r"


def test_config_layers(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('group_id = "from-file"\nmax_streams = 10\nheads = ["a"]\n[client]\nsecurity_protocol = "SSL"\n')
    env = {"RWKV_STREAM_CONSUME_MAX_STREAMS": "20", "RWKV_STREAM_CONSUME_CREATE_TOPICS": "false",
           "RWKV_STREAM_CONSUME_CLIENT_SASL_MECHANISM": "PLAIN", "RWKV_STREAM_CONSUME_CLIENT_RETRIES": "3"}
    cfg = load_config(toml, env=env, overrides={"delivery": "exactly-once", "group_id": None})
    assert cfg.group_id == "from-file" and cfg.max_streams == 20 and cfg.create_topics is False
    assert cfg.heads == ["a"] and cfg.exactly_once
    assert cfg.client == {"security_protocol": "SSL", "sasl_mechanism": "PLAIN", "retries": 3}
    assert cfg.resolved_transactional_id.startswith("from-file-")
    with pytest.raises(ValueError):
        ConsumerConfig(delivery="at-most-once")
    with pytest.raises(ValueError):
        ConsumerConfig(output_topic="transcripts")
    with pytest.raises(ValueError, match="dtype must be one of .*'int4'"):
        ConsumerConfig(dtype="int4")
    assert ConsumerConfig(dtype="w8a8").dtype == "w8a8"
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config(bad, env={})


def test_shipped_config_file_parses():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "consumer.toml", env={})
    assert cfg.delivery in ("at-least-once", "exactly-once")


def test_fault_rules():
    faults = Faults("seed=3;commit_fail~1.0;kill@before_commit=2")
    assert faults.kill_at == {"before_commit": 2}
    with pytest.raises(InjectedCommitFailure):
        faults.commit()
    faults.point("before_commit")  # the first time: no kill
    assert not Faults("").enabled
    with pytest.raises(ValueError):
        Faults("kill@nowhere=1")


def test_snapshot_codec_compresses_and_chunks():
    codec = SnapshotCodec(chunk_bytes=1000, compress_over=100)
    small = bytes(50)
    assert codec.payload(small) == ("none", small)
    big = bytes(range(256)) * 40
    kind, payload = codec.payload(big)
    assert kind == "zlib" and unpack_payload(kind, payload) == big
    chunks = codec.chunks(b"x" * 2500)
    assert [len(c) for c in chunks] == [1000, 1000, 500]
