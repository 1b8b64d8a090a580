"""init-topics, dlq-replay, headers kept, JSON in and out, per-partition lag, readiness: real broker, in-process."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka_broker import admin_client, unique_name  # noqa: E402
from kafka_harness import Planned, produce, read_topic  # noqa: E402
from rwkv_stream.components.kafka import schema  # noqa: E402
from rwkv_stream.components.kafka.config import ConsumerConfig  # noqa: E402
from rwkv_stream.components.kafka.processor import Processor  # noqa: E402
from rwkv_stream.components.kafka.topics import partition_count  # noqa: E402

from rwkv_stream.cli import main as rwkv_main  # noqa: E402
from rwkv_stream.loading import load_source  # noqa: E402

pytestmark = [pytest.mark.kafka, pytest.mark.usefixtures("one_torch_thread")]



def metric(proc, name: str, **labels: str) -> float:
    """A sample of the processor's registry, as Prometheus would scrape it (0 when not yet recorded)."""
    return proc.metrics.registry.get_sample_value(name, labels) or 0.0

@pytest.fixture(scope="module")
def bundle_dir(tiny_bundle_dir):
    return tiny_bundle_dir


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _args(bootstrap: str, name: str, bundle_dir) -> list[str]:
    return ["--bootstrap-servers", bootstrap, "--group-id", name, "--input-topic", f"{name}.in",
            "--output-topic", f"{name}.out", "--dead-letter-topic", f"{name}.dlq", "--state-topic", f"{name}.state",
            "--bundle", str(bundle_dir), "--replication-factor", "1"]


def _config(bootstrap: str, name: str, bundle_dir, tmp_path, **kw) -> ConsumerConfig:
    base = dict(bootstrap_servers=bootstrap, group_id=name, input_topic=f"{name}.in", output_topic=f"{name}.out",
                dead_letter_topic=f"{name}.dlq", state_topic=f"{name}.state", bundle=str(bundle_dir),
                instance_id=name, replication_factor=1, session_timeout_ms=6000, heartbeat_interval_ms=1000,
                checkpoint_interval_ms=200, readiness_file=str(tmp_path / f"{name}.ready"), create_topics=False)
    return ConsumerConfig(**{**base, **kw})


def _wait(probe, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_init_topics_creates_all_four(kafka_bootstrap, bundle_dir, capsys):
    name = unique_name("init")
    assert rwkv_main(["kafka", "init-topics", *_args(kafka_bootstrap, name, bundle_dir)]) == 2  # no --partitions
    assert rwkv_main(["kafka", "init-topics", *_args(kafka_bootstrap, name, bundle_dir), "--partitions", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["role"]: r["created"] for r in report} == {"input": True, "output": True, "dead_letter": True,
                                                          "state": True}
    admin = admin_client(kafka_bootstrap)
    try:
        for suffix in ("in", "out", "dlq", "state"):
            assert partition_count(admin, f"{name}.{suffix}") == 3
        from kafka.admin import ConfigResource, ConfigResourceType

        configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, f"{name}.state")])
        text = repr(configs)
        assert "cleanup.policy" in text and "compact" in text
    finally:
        admin.close()
    # a second run changes nothing; a mismatching --partitions is refused
    assert rwkv_main(["kafka", "init-topics", *_args(kafka_bootstrap, name, bundle_dir)]) == 0
    assert not any(r["created"] for r in json.loads(capsys.readouterr().out))
    assert rwkv_main(["kafka", "init-topics", *_args(kafka_bootstrap, name, bundle_dir), "--partitions", "5"]) == 2


def test_json_headers_lag_readiness_and_dlq_replay(kafka_bootstrap, bundle_dir, tmp_path, capsys):
    name = unique_name("json")
    assert rwkv_main(["kafka", "init-topics", *_args(kafka_bootstrap, name, bundle_dir), "--partitions", "2"]) == 0
    capsys.readouterr()
    good = [Planned("call-1", schema.encode_input_json("hello there ")),
            Planned("call-1", schema.encode_input("and how are you", end=True)),
            Planned("call-2", schema.encode_input_json("x" * 120))]  # too large for max_fragment_chars=100
    records = produce(kafka_bootstrap, f"{name}.in", good[:1], headers=[("traceparent", TRACEPARENT),
                                                                        ("tenant", b"acme")])
    records += produce(kafka_bootstrap, f"{name}.in", good[1:])
    bundle = load_source(bundle_dir)
    cfg = _config(kafka_bootstrap, name, bundle_dir, tmp_path, output_format="json", max_fragment_chars=100)
    proc = Processor(cfg, bundle=bundle)
    thread = threading.Thread(target=proc.run, daemon=True)
    thread.start()
    ready = tmp_path / f"{name}.ready"
    try:
        _wait(ready.exists, "readiness file")
        assert json.loads(ready.read_text())["state"] == "ready"
        _wait(lambda: len(read_topic(kafka_bootstrap, cfg.output_topic)) >= 2, "outputs")
        _wait(lambda: len(read_topic(kafka_bootstrap, cfg.dead_letter_topic)) >= 1, "dead letter")
        _wait(lambda: metric(proc, "rwkv_stream_consumer_lag", partition=str(records[0].partition)) == 0, "lag 0", 10)
        assert proc.metrics.registry.get_sample_value("rwkv_stream_readiness",
                                                      {"rwkv_stream_readiness": "ready"}) == 1
    finally:
        proc.stop()
        thread.join(60)
    assert not ready.exists()
    outs = _read_with_headers(kafka_bootstrap, cfg.output_topic)
    first = [o for o in outs if o[1]["offset"] == records[0].offset and o[1]["partition"] == records[0].partition]
    value, headers = first[0][1], first[0][2]
    assert first[0][0].lstrip().startswith(b"{")  # JSON
    assert headers["traceparent"] == TRACEPARENT and headers["tenant"] == b"acme"
    assert headers["content-type"] == b"application/json"
    assert value["tokens"] and value["stream"] == "call-1"
    dead = _read_with_headers(kafka_bootstrap, cfg.dead_letter_topic)
    assert [d[1]["reason"] for d in dead] == [schema.FRAGMENT_TOO_LARGE]
    assert dead[0][1]["value"] == records[2].value  # original bytes, base64 in JSON, decoded back
    # replay: only fragment_too_large; the fixed processor (a larger limit) now processes it
    args = _args(kafka_bootstrap, name, bundle_dir)
    assert rwkv_main(["kafka", "dlq-replay", *args, "--reason", "not_msgpack"]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == 0
    assert rwkv_main(["kafka", "dlq-replay", *args, "--reason", schema.FRAGMENT_TOO_LARGE]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == 1
    replayed = [r for r in read_topic(kafka_bootstrap, cfg.input_topic) if r[3] == records[2].value]
    assert len(replayed) == 2


def _read_with_headers(bootstrap: str, topic: str) -> list[tuple[bytes, dict, dict[str, bytes]]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for _tp, recs in consumer.poll(timeout_ms=200).items():
                for r in recs:
                    decode = schema.decode_dead_letter if topic.endswith(".dlq") else schema.decode_output
                    out.append((r.value, decode(r.value), dict(r.headers or [])))
        return out
    finally:
        consumer.close()
