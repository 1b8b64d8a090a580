"""kafka-python internals the processor uses (components/kafka/client_compat.py), and what kafka-python really
sends with a transactional offset commit (KIP-447), against the real broker."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("kafka", reason="kafka-python not installed (pip install -e .[kafka])")

from kafka import KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.errors import CommitFailedError, KafkaError  # noqa: E402
from kafka.structs import ConsumerGroupMetadata, OffsetAndMetadata  # noqa: E402
from kafka_broker import create_topic, unique_name, wait_for_transaction_coordinator  # noqa: E402
from rwkv_stream.components.kafka import client_compat  # noqa: E402
from rwkv_stream.components.kafka.checkpoint import StaleWork, check_membership  # noqa: E402

pytestmark = [pytest.mark.kafka]


def test_private_attributes_used_by_the_processor_are_there(kafka_bootstrap):
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None)
    try:
        client_compat.check(consumer)  # raises ClientCompatError naming what changed
        client_compat.unpark_fetched_records(consumer)
        assert callable(client_compat.event_loop_sleep(consumer))
    finally:
        consumer.close()
    with pytest.raises(client_compat.ClientCompatError, match="_net.sleep.*_fetcher"):
        client_compat.check(SimpleNamespace())


def _joined_consumer(bootstrap: str, group: str, topic: str) -> KafkaConsumer:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             session_timeout_ms=6000, heartbeat_interval_ms=1000)
    deadline = time.monotonic() + 60
    while not consumer.assignment() or consumer.group_metadata().generation_id < 0:
        assert time.monotonic() < deadline, "consumer did not join"
        consumer.poll(timeout_ms=100)
    return consumer


def _wait_committed(consumer: KafkaConsumer, tp: TopicPartition, offset: int, timeout_s: float = 15.0) -> None:
    """A committed transaction's offsets become visible once its markers are written (asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while consumer.committed(tp) != offset:
        assert time.monotonic() < deadline, f"committed offset {consumer.committed(tp)}, expected {offset}"
        time.sleep(0.1)


def _commit_in_txn(producer: KafkaProducer, offsets, metadata) -> None:
    producer.begin_transaction()
    try:
        producer.send_offsets_to_transaction(offsets, metadata)
        producer.commit_transaction()
    except KafkaError:
        producer.abort_transaction()
        raise


def test_txn_offset_commit_sends_group_metadata_and_what_the_broker_fences(kafka_bootstrap):
    """kafka-python sends TxnOffsetCommit v3 with generation and member id: a stale generation is refused (the
    transaction aborts). Generation -1 with no member id is accepted even though the group has a live member:
    that is why the processor refuses to commit while its consumer is not a member (check_membership)."""
    name = unique_name("kip447")
    create_topic(kafka_bootstrap, name, partitions=1)
    wait_for_transaction_coordinator(kafka_bootstrap)
    consumer = _joined_consumer(kafka_bootstrap, name, name)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=name)
    try:
        producer.init_transactions()
        assert client_compat.txn_offset_commit_version(producer) == 3
        live = consumer.group_metadata()
        assert live.generation_id >= 1 and live.member_id
        tp = TopicPartition(name, 0)
        stale = live._replace(generation_id=live.generation_id + 5)
        with pytest.raises(CommitFailedError):
            _commit_in_txn(producer, {tp: OffsetAndMetadata(1, "", -1)}, stale)
        _commit_in_txn(producer, {tp: OffsetAndMetadata(2, "", -1)}, live)
        _wait_committed(consumer, tp, 2)
        unjoined = ConsumerGroupMetadata(group_id=name)  # what a fenced-out kafka-python consumer reports
        _commit_in_txn(producer, {tp: OffsetAndMetadata(3, "", -1)}, unjoined)
        _wait_committed(consumer, tp, 3)  # fails if the broker starts fencing generation -1 commits
        with pytest.raises(StaleWork):
            check_membership(unjoined)
        check_membership(live)
    finally:
        producer.close(timeout=10)
        consumer.close()
