"""The real Kafka test broker (scripts/kafka/broker.sh) works with kafka-python the way the stream
processor uses it: explicit topics, consumer groups with manual commits, transactions read with
read_committed, and a broker stop/restart that keeps topics, records and committed offsets."""

from __future__ import annotations

import time

import pytest
from kafka_broker import (
    KafkaBroker,
    create_topic,
    prime_metadata,
    unique_name,
    wait_for_group_coordinator,
    wait_for_transaction_coordinator,
)

# Registers the kafka_broker / kafka_bootstrap / private_kafka_broker fixtures (one plugin, so one
# session broker, even when tests/conftest.py also lists it).

kafka = pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")
from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.structs import OffsetAndMetadata  # noqa: E402

pytestmark = pytest.mark.kafka


def _producer(bootstrap: str, **kwargs) -> KafkaProducer:
    kwargs.setdefault("acks", "all")
    kwargs.setdefault("linger_ms", 0)
    kwargs.setdefault("max_block_ms", 20000)
    kwargs.setdefault("request_timeout_ms", 10000)
    return KafkaProducer(bootstrap_servers=bootstrap, **kwargs)


def _consumer(bootstrap: str, *topics: str, **kwargs) -> KafkaConsumer:
    kwargs.setdefault("auto_offset_reset", "earliest")
    kwargs.setdefault("enable_auto_commit", False)
    kwargs.setdefault("request_timeout_ms", 10000)
    consumer = KafkaConsumer(*topics, bootstrap_servers=bootstrap, **kwargs)
    prime_metadata(consumer, topics)
    return consumer


def _poll_n(consumer: KafkaConsumer, n: int, timeout: float = 20.0, settle: float = 0.0) -> list:
    """Poll until n records arrived (then `settle` more seconds to catch extras) or the timeout."""
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < n and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    end = time.monotonic() + settle
    while time.monotonic() < end:
        for batch in consumer.poll(timeout_ms=100).values():
            records.extend(batch)
    return records


def test_broker_is_up(kafka_broker: KafkaBroker):
    assert kafka_broker.bootstrap.startswith("127.0.0.1:")
    assert kafka_broker.is_running()
    wait_for_group_coordinator(kafka_broker.bootstrap, timeout=30)


def test_produce_consume_group_commit(kafka_bootstrap: str):
    topic = create_topic(kafka_bootstrap, unique_name("plain"), partitions=3)
    compacted = create_topic(
        kafka_bootstrap,
        unique_name("compact"),
        partitions=2,
        compacted=True,
        config={"min.cleanable.dirty.ratio": "0.01"},
    )
    group = unique_name("g")
    producer = _producer(kafka_bootstrap)
    try:
        for i in range(30):
            producer.send(topic, key=f"k{i % 7}".encode(), value=f"v{i}".encode())
        producer.send(compacted, key=b"state", value=b"snapshot")
        producer.flush(timeout=20)
    finally:
        producer.close(timeout=5)

    consumer = _consumer(kafka_bootstrap, topic, group_id=group)
    try:
        records = _poll_n(consumer, 30)
        assert sorted(r.value for r in records) == sorted(f"v{i}".encode() for i in range(30))
        # records with one key stay in order on one partition
        by_key: dict[bytes, list[int]] = {}
        for r in records:
            by_key.setdefault(r.key, []).append(int(r.value[1:]))
            assert r.partition in (0, 1, 2)
        assert all(v == sorted(v) for v in by_key.values())
        consumer.commit()
        positions = {tp: consumer.position(tp) for tp in consumer.assignment()}
        assert sum(positions.values()) == 30
        for tp, pos in positions.items():
            assert consumer.committed(tp) == pos
    finally:
        consumer.close()

    # A new member of the same group resumes from the committed offsets: nothing old is seen again.
    producer = _producer(kafka_bootstrap)
    try:
        for i in range(30, 35):
            producer.send(topic, key=b"late", value=f"v{i}".encode())
        producer.flush(timeout=20)
    finally:
        producer.close(timeout=5)
    consumer = _consumer(kafka_bootstrap, topic, group_id=group)
    try:
        records = _poll_n(consumer, 5, settle=0.5)
        assert sorted(r.value for r in records) == [f"v{i}".encode() for i in range(30, 35)]
    finally:
        consumer.close()

    reader = _consumer(kafka_bootstrap, compacted)  # no group: plain assign + earliest
    try:
        assert [(r.key, r.value) for r in _poll_n(reader, 1)] == [(b"state", b"snapshot")]
    finally:
        reader.close()


def test_transactions_read_committed(kafka_bootstrap: str):
    source = create_topic(kafka_bootstrap, unique_name("src"), partitions=1)
    sink = create_topic(kafka_bootstrap, unique_name("sink"), partitions=2)
    group = unique_name("txg")
    wait_for_transaction_coordinator(kafka_bootstrap, timeout=30)

    plain = _producer(kafka_bootstrap)
    for i in range(4):
        plain.send(source, value=f"in{i}".encode())
    plain.flush(timeout=20)
    plain.close(timeout=5)

    producer = _producer(kafka_bootstrap, transactional_id=unique_name("tx"), enable_idempotence=True)
    consumer = _consumer(kafka_bootstrap, source, group_id=group, isolation_level="read_committed")
    try:
        producer.init_transactions()
        inputs = _poll_n(consumer, 4)
        assert len(inputs) == 4
        tp = TopicPartition(source, 0)

        # 1) consume-transform-produce: outputs and the input offsets commit atomically
        producer.begin_transaction()
        for r in inputs[:2]:
            producer.send(sink, key=b"a", value=b"out-" + r.value)
        producer.send_offsets_to_transaction(
            {tp: OffsetAndMetadata(inputs[1].offset + 1, "", -1)}, consumer.group_metadata()
        )
        producer.commit_transaction()

        # 2) aborted: neither its outputs nor its offsets may become visible
        producer.begin_transaction()
        for r in inputs[2:]:
            producer.send(sink, key=b"a", value=b"aborted-" + r.value)
        producer.send_offsets_to_transaction(
            {tp: OffsetAndMetadata(inputs[3].offset + 1, "", -1)}, consumer.group_metadata()
        )
        producer.flush()  # abort_transaction() would drop still-unsent records: write them, then abort
        producer.abort_transaction()

        # 3) committed again
        producer.begin_transaction()
        producer.send(sink, key=b"a", value=b"out-last")
        producer.commit_transaction()
        committed = consumer.committed(tp)
    finally:
        consumer.close()
        producer.close(timeout=5)

    assert committed == inputs[1].offset + 1  # the aborted transaction's offsets were discarded

    rc = _consumer(kafka_bootstrap, sink, isolation_level="read_committed")
    ru = _consumer(kafka_bootstrap, sink, isolation_level="read_uncommitted")
    try:
        got_rc = [r.value for r in _poll_n(rc, 3, settle=0.5)]
        got_ru = [r.value for r in _poll_n(ru, 5, settle=0.5)]
    finally:
        rc.close()
        ru.close()
    assert got_rc == [b"out-in0", b"out-in1", b"out-last"]
    assert sorted(got_ru) == sorted([b"out-in0", b"out-in1", b"aborted-in2", b"aborted-in3", b"out-last"])


def test_restart_keeps_data(kafka_broker: KafkaBroker):
    if kafka_broker.run_dir is None:
        pytest.skip("external broker without a known run dir (set RWKV_STREAM_KAFKA_DIR) cannot be restarted")
    bootstrap = kafka_broker.bootstrap
    topic = create_topic(bootstrap, unique_name("durable"), partitions=2)
    group = unique_name("rg")
    producer = _producer(bootstrap, retries=20, retry_backoff_ms=200)
    try:
        for i in range(10):
            producer.send(topic, key=f"k{i}".encode(), value=f"before{i}".encode())
        producer.flush(timeout=20)
        consumer = _consumer(bootstrap, topic, group_id=group)
        try:
            assert len(_poll_n(consumer, 10)) == 10
            consumer.commit()
        finally:
            consumer.close()

        t0 = time.monotonic()
        assert kafka_broker.restart() == bootstrap  # same data dir, same ports
        restart_s = time.monotonic() - t0
        assert kafka_broker.is_running()

        # The producer created before the restart reconnects by itself.
        for i in range(3):
            producer.send(topic, key=f"k{i}".encode(), value=f"after{i}".encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)

    wait_for_group_coordinator(bootstrap, group, timeout=30)
    consumer = _consumer(bootstrap, topic, group_id=group)
    try:
        records = _poll_n(consumer, 3, settle=0.5)
        assert sorted(r.value for r in records) == [b"after0", b"after1", b"after2"]  # offsets survived
    finally:
        consumer.close()
    everything = _consumer(bootstrap, topic)
    try:
        assert len(_poll_n(everything, 13, settle=0.3)) == 13  # records survived
    finally:
        everything.close()
    assert restart_s < 60
