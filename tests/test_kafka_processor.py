"""The Kafka stream processor against the real broker, in-process: happy path, dead letters, restarts from the
state topic (with chunked snapshots and evictions), backpressure and metrics. Faults: test_kafka_faults.py."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import msgpack
import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka_broker import create_topic, unique_name  # noqa: E402  (fixtures: conftest plugin)
from kafka_harness import (  # noqa: E402
    Planned,
    check_outputs,
    interleave,
    produce,
    read_topic,
    reference_outputs,
    stream_script,
    wait_for_outputs,
)
from rwkv_stream.components.kafka import schema  # noqa: E402
from rwkv_stream.components.kafka.clients import ClientFactory  # noqa: E402
from rwkv_stream.components.kafka.config import ConsumerConfig  # noqa: E402
from rwkv_stream.components.kafka.processor import Processor  # noqa: E402

from rwkv_stream.loading import LoadedModel, load_source  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]
SEED = 1129



def metric(proc, name: str, **labels: str) -> float:
    """A sample of the processor's registry, as Prometheus would scrape it (0 when not yet recorded)."""
    return proc.metrics.registry.get_sample_value(name, labels) or 0.0

@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_dir):
    return tiny_bundle_dir


@pytest.fixture(scope="module")
def bundle(bundle_dir) -> LoadedModel:
    return load_source(bundle_dir)


def _config(bootstrap: str, name: str, bundle_dir, **kw) -> ConsumerConfig:
    base = dict(bootstrap_servers=bootstrap, group_id=name, input_topic=f"{name}.in", output_topic=f"{name}.out",
                dead_letter_topic=f"{name}.dlq", state_topic=f"{name}.state", bundle=str(bundle_dir),
                instance_id=name, replication_factor=1, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                transaction_timeout_ms=10000, checkpoint_interval_ms=200)
    return ConsumerConfig(**{**base, **kw})


@contextlib.contextmanager
def running(cfg: ConsumerConfig, bundle: LoadedModel) -> Iterator[Processor]:
    proc = Processor(cfg, bundle=bundle)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            proc.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert proc.started.wait(60), "processor did not start"
    try:
        yield proc
    finally:
        proc.stop()
        thread.join(60)
        assert not thread.is_alive(), "processor did not stop"
        if errors:
            raise errors[0]


def _plan(seed: int, n_streams: int = 12, n_fragments: int = 10) -> list[Planned]:
    rng = random.Random(seed)
    scripts = [stream_script(f"call-{i}", rng, n_fragments, end=i % 3 == 0, generate_every=4 if i % 4 == 1 else 0)
               for i in range(n_streams)]
    return interleave(scripts, rng)


@pytest.mark.parametrize("delivery", ["at-least-once", "exactly-once"])
def test_happy_path_outputs_equal_streams_fed_alone(kafka_bootstrap, bundle_dir, bundle, delivery):
    print("seed", SEED)
    name = unique_name("happy")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=3)
    records = produce(kafka_bootstrap, f"{name}.in", _plan(SEED))
    assert len({r.partition for r in records}) == 3
    ref = reference_outputs(bundle, records)
    cfg = _config(kafka_bootstrap, name, bundle_dir, delivery=delivery)
    with running(cfg, bundle) as proc:
        outs = wait_for_outputs(kafka_bootstrap, cfg.output_topic, set(ref.outputs), read_committed=True,
                                timeout_s=60)
    counts = check_outputs(ref, outs, exactly_once=True)
    assert counts["outputs"] == len(records)
    assert metric(proc, "rwkv_stream_records_total", result="processed") == len(records)
    # Output keys are the stream ids; generations were made.
    assert any(schema.decode_output(v)["generated"] for _, v in outs)
    # The state topic: a snapshot per open stream at its last offset, an end marker/tombstone for ended ones.
    states = _latest_states(kafka_bootstrap, cfg.state_topic, read_committed=True)
    for (partition, stream), offsets in ref.streams.items():
        ended = ref.outputs[(partition, offsets[-1])]["end"]
        value = states.get(stream)
        if ended:
            assert value is None or value["kind"] == "ended", (stream, value)
        else:
            assert value["kind"] == "state" and value["applied"] == offsets[-1], (stream, value)


def _latest_states(bootstrap: str, topic: str, read_committed: bool) -> dict[str, dict | None]:
    latest: dict[str, dict | None] = {}
    for _p, _o, key, value in read_topic(bootstrap, topic, read_committed=read_committed):
        latest[key.decode()] = None if value is None else msgpack.unpackb(value, raw=False)
    return latest


def test_bad_input_goes_to_dead_letter_and_leaves_streams_unchanged(kafka_bootstrap, bundle_dir, bundle):
    name = unique_name("dlq")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=2)
    good = _plan(SEED + 1, n_streams=4, n_fragments=6)
    bad = [
        Planned("call-0", b"\xc1 definitely not msgpack"),
        Planned("call-1", msgpack.packb({"v": 99, "text": "from the future"})),
        Planned("call-2", msgpack.packb({"v": 1, "text": b"caf\xc3("}, use_bin_type=False)),
        Planned("call-3", schema.encode_input("x" * 300)),
        Planned("call-0", schema.encode_input("hello", action="rewind")),
        Planned("call-1", schema.encode_input("x"), key=b"\xff\xfebad-key"),
        Planned("call-2", schema.encode_input("x", generate={"max_tokens": 10_000})),
    ]
    rng = random.Random(SEED)
    plan = list(good)
    for b in bad:  # bad records in the middle of the good streams
        plan.insert(rng.randrange(1, len(plan)), b)
    records = produce(kafka_bootstrap, f"{name}.in", plan)
    ref = reference_outputs(bundle, records, max_fragment_chars=200)
    assert len(ref.dead) == len(bad)
    # Streams are unchanged by bad records: the reference without them gives the same outputs.
    clean = reference_outputs(bundle, [r for r in records if (r.partition, r.offset) not in ref.dead],
                              max_fragment_chars=200)
    assert clean.outputs == ref.outputs
    cfg = _config(kafka_bootstrap, name, bundle_dir, max_fragment_chars=200)
    with running(cfg, bundle) as proc:
        outs = wait_for_outputs(kafka_bootstrap, cfg.output_topic, set(ref.outputs), read_committed=True,
                                timeout_s=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            dead = read_topic(kafka_bootstrap, cfg.dead_letter_topic)
            if len(dead) >= len(bad):
                break
            time.sleep(0.3)
    check_outputs(ref, outs, exactly_once=True)
    by_offset = {(r.partition, r.offset): r for r in records}
    got = {}
    for _p, _o, key, value in dead:
        letter = schema.decode_dead_letter(value)
        original = by_offset[(letter["partition"], letter["offset"])]
        assert letter["value"] == original.value and letter["key"] == original.key == key
        assert letter["topic"] == cfg.input_topic and letter["detail"]
        got[(letter["partition"], letter["offset"])] = letter["reason"]
    assert got == ref.dead
    assert sorted(got.values()) == sorted([schema.NOT_MSGPACK, schema.SCHEMA_VERSION_MISMATCH, schema.INVALID_UTF8,
                                           schema.FRAGMENT_TOO_LARGE, schema.UNKNOWN_ACTION, schema.INVALID_UTF8,
                                           schema.BAD_GENERATION])
    assert metric(proc, "rwkv_stream_dead_letters_total", reason=schema.INVALID_UTF8) == 2


def test_restart_restores_chunked_states_and_evicted_streams(kafka_bootstrap, bundle_dir, bundle):
    """A stop after half the input and a new processor: states come back from the state topic (chunked and
    compressed: tiny limits), streams beyond max_streams and idle ones are evicted and reloaded, and the
    outputs continue exactly."""
    name = unique_name("restart")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=2)
    plan = _plan(SEED + 2, n_streams=10, n_fragments=8)
    half = len(plan) // 2
    settings = dict(max_streams=4, max_batch_records=4, state_chunk_bytes=700, state_compress_over=500,
                    idle_ttl_s=0.5, state_cache_bytes=3000)
    cfg = _config(kafka_bootstrap, name, bundle_dir, **settings)
    first = produce(kafka_bootstrap, cfg.input_topic, plan[:half])
    with running(cfg, bundle) as proc:
        wait_for_outputs(kafka_bootstrap, cfg.output_topic, {(r.partition, r.offset) for r in first},
                         read_committed=True, timeout_s=60)
        time.sleep(2.0)  # idle streams get evicted
    assert metric(proc, "rwkv_stream_evictions_total", reason="lru") > 0
    assert metric(proc, "rwkv_stream_evictions_total", reason="idle") > 0
    chunks = [k for _p, _o, k, _v in read_topic(kafka_bootstrap, cfg.state_topic) if b"\x1f" in k]
    assert chunks, "snapshots over state_chunk_bytes must be chunked"
    rest = produce(kafka_bootstrap, cfg.input_topic, plan[half:])
    ref = reference_outputs(bundle, first + rest)
    with running(cfg, bundle) as proc:
        outs = wait_for_outputs(kafka_bootstrap, cfg.output_topic, set(ref.outputs), read_committed=True,
                                timeout_s=60)
    assert metric(proc, "rwkv_stream_restored_streams_total") > 0
    check_outputs(ref, outs, exactly_once=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backpressure_and_metrics_endpoint(kafka_bootstrap, bundle_dir, bundle):
    name = unique_name("bp")
    create_topic(kafka_bootstrap, f"{name}.in", partitions=2)
    records = produce(kafka_bootstrap, f"{name}.in", _plan(SEED + 3, n_streams=8, n_fragments=25))
    ref = reference_outputs(bundle, records)
    port = _free_port()
    cfg = _config(kafka_bootstrap, name, bundle_dir, max_buffered_records=20, max_batch_records=5, max_poll_records=50,
                  metrics_port=port, metrics_addr="127.0.0.1")
    paused_seen = 0.0
    with running(cfg, bundle) as proc:
        deadline = time.monotonic() + 60
        while (metric(proc, "rwkv_stream_records_total", result="processed") < len(records)
               and time.monotonic() < deadline):
            paused_seen = max(paused_seen, metric(proc, "rwkv_stream_paused_partitions"))
            time.sleep(0.01)
        outs = wait_for_outputs(kafka_bootstrap, cfg.output_topic, set(ref.outputs), read_committed=True,
                                timeout_s=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    check_outputs(ref, outs, exactly_once=True)
    assert paused_seen > 0, "fetching was never paused"
    for name in ("rwkv_stream_tokens_total", "rwkv_stream_fragment_latency_seconds_bucket",
                 "rwkv_stream_live_streams", "rwkv_stream_state_bytes", "rwkv_stream_rebalances_total",
                 "rwkv_stream_dead_letters_total", "rwkv_stream_checkpoints_total"):
        assert name in text, name
    tokens = [line for line in text.splitlines() if line.startswith("rwkv_stream_tokens_total")]
    assert float(tokens[0].split()[-1]) > 0


def test_kafka_python_client_metrics_are_off_unless_asked_for(bundle_dir):
    """kafka-python's own sensors cost CPU per request and record; off by default, a client option turns them on."""
    quiet = ClientFactory(_config("127.0.0.1:1", "m", bundle_dir))
    assert quiet.consumer_config()["metrics_enabled"] is False
    assert quiet.reader_config()["metrics_enabled"] is False
    assert quiet.producer_config("out")["metrics_enabled"] is False
    assert quiet.producer_config("state")["metrics_enabled"] is False
    asked = ClientFactory(_config("127.0.0.1:1", "m", bundle_dir, client={"metrics_enabled": True}))
    assert asked.consumer_config()["metrics_enabled"] is True
    assert asked.reader_config()["metrics_enabled"] is True
    assert asked.producer_config("out")["metrics_enabled"] is True
