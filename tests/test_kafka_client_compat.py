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


@pytest.mark.parametrize("hardened", [False, True])
def test_a_refused_offset_commit_never_rides_along_with_the_next_transaction(kafka_bootstrap, hardened):
    """kafka-python 3.0.12 keeps the offsets of a refused TxnOffsetCommit (a zombie's: stale membership) and sends
    them again with the next transaction's offsets, under the next (valid) membership: offsets of partitions the
    member never committed in that transaction get committed (the soak's lost records and duplicates). The
    processor sends offsets through ``client_compat.send_offsets_to_transaction``, which drops them first."""
    name = unique_name("leak")
    create_topic(kafka_bootstrap, name, partitions=2)
    wait_for_transaction_coordinator(kafka_bootstrap)
    consumer = _joined_consumer(kafka_bootstrap, name, name)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=name)
    send = (lambda offsets, metadata: client_compat.send_offsets_to_transaction(producer, offsets, metadata)) \
        if hardened else producer.send_offsets_to_transaction
    first, second = TopicPartition(name, 0), TopicPartition(name, 1)
    try:
        producer.init_transactions()
        live = consumer.group_metadata()
        zombie = live._replace(member_id="a-member-fenced-out-long-ago")
        producer.begin_transaction()
        with pytest.raises(CommitFailedError):
            send({second: OffsetAndMetadata(100, "", -1)}, zombie)
        producer.abort_transaction()
        producer.begin_transaction()
        send({first: OffsetAndMetadata(7, "", -1)}, live)
        producer.commit_transaction()
        _wait_committed(consumer, first, 7)
        assert consumer.committed(second) == (None if hardened else 100)  # unhardened: the zombie's offset leaked
    finally:
        producer.close(timeout=10)
        consumer.close()


def _aborted_by_coordinator(bootstrap: str, tp: TopicPartition, timeout_s: float = 60.0) -> None:
    """Wait until the transaction coordinator has aborted the open transaction on ``tp`` (the last stable
    offset, which a read_committed consumer sees as the end, moves past its records)."""
    reader = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    try:
        deadline = time.monotonic() + timeout_s
        while reader.end_offsets([tp])[tp] == 0:
            assert time.monotonic() < deadline, "the coordinator did not abort the timed-out transaction"
            time.sleep(0.2)
    finally:
        reader.close()


@pytest.mark.parametrize("hardened", [False, True])
def test_a_timed_out_transaction_never_continues_silently(kafka_bootstrap, hardened):
    """A member frozen past ``transaction_timeout_ms``: the coordinator aborts its transaction and bumps its
    epoch. kafka-python 3.0.12 then bumps the epoch by itself on the next produce error (KIP-360) and carries on
    in state READY: the records of the open transaction are gone. The processor's producers are hardened
    (``fail_loudly_instead_of_epoch_bump``): the producer turns fatal, and every later call raises, so the
    processor aborts, rolls back and re-creates it. Either way nothing of the transaction is ever committed."""
    topic = unique_name("bump")
    create_topic(kafka_bootstrap, topic, partitions=1)
    wait_for_transaction_coordinator(kafka_bootstrap)
    tp = TopicPartition(topic, 0)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=unique_name("txn"), acks="all",
                             transaction_timeout_ms=1000)
    if hardened:
        client_compat.fail_loudly_instead_of_epoch_bump(producer)
    manager = producer._transaction_manager
    try:
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, b"first").get(timeout=30)
        epoch = manager.producer_id_and_epoch
        _aborted_by_coordinator(kafka_bootstrap, tp)
        late = producer.send(topic, b"after the timeout")
        producer.flush(timeout=30)
        assert late.failed()
        deadline = time.monotonic() + 30
        while manager.is_bumping_epoch():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        if hardened:
            assert manager.has_fatal_error()
            assert manager.producer_id_and_epoch == epoch  # no silent bump
            with pytest.raises(KafkaError, match="failed with errors"):
                producer.send(topic, b"more")
        else:  # kafka-python's own recovery: a new epoch, no transaction, no error to read
            assert not manager.has_error()
            assert manager.producer_id_and_epoch.epoch > epoch.epoch
        with pytest.raises(KafkaError):
            producer.commit_transaction()
    finally:
        producer.close(timeout=5)
    reader = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, isolation_level="read_committed",
                           auto_offset_reset="earliest", consumer_timeout_ms=2000)
    try:
        assert [r.value for r in reader] == []
    finally:
        reader.close()
