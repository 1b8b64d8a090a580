"""Every use of kafka-python internals (private attributes) by the processor, in one place.

The processor otherwise uses kafka-python's public API only. What is used here, and why:

* ``KafkaConsumer._net.sleep``: the consumer's event loop's awaitable sleep. The rebalance listener runs on
  kafka-python's I/O thread as a coroutine; it must await a worker thread without blocking that loop (which
  also sends heartbeats), and kafka-python offers no public awaitable for it.
* ``KafkaConsumer._fetcher._next_partition_records`` / ``._paused_partition_records``: a kafka-python 3.0.12
  stall after pause/resume (see :func:`unpark_fetched_records`).

* ``KafkaProducer._transaction_manager.classify_batch_error``: a transactional producer must never bump its
  epoch on its own (see :func:`fail_loudly_instead_of_epoch_bump`).
* ``KafkaProducer._transaction_manager._pending_txn_offset_commits`` (and its ``_lock``): offsets of a failed
  transactional offset commit that kafka-python would send again with the next transaction's (see
  :func:`send_offsets_to_transaction`).

``KafkaProducer._sender._client`` (diagnostics only, :func:`txn_offset_commit_version`): the negotiated wire version.

:func:`check` verifies that all of them are still there (``tests/test_kafka_client_compat.py`` calls it on
a real consumer), so an upgrade of kafka-python that renames them fails the tests instead of the processor.
Supported: kafka-python 3.0.x (``SUPPORTED``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

SUPPORTED = ("3.0.",)


class ClientCompatError(RuntimeError):
    """kafka-python changed something the processor relies on."""


def event_loop_sleep(consumer: Any) -> Callable[[float], Any]:
    """An awaitable sleep on the consumer's I/O event loop (for the rebalance listener)."""
    return consumer._net.sleep


def unpark_fetched_records(consumer: Any) -> None:
    """Work around a kafka-python 3.0.12 stall (call before every poll): records fetched for a partition that
    was then paused are parked, and after its resume they are put back only when the fetcher's in-line slot is
    ``None``; an exhausted (empty) slot blocks that, and a partition with parked records is never fetched again,
    so it would stay stuck for good."""
    fetcher = consumer._fetcher
    current = fetcher._next_partition_records
    if current is not None and not current and fetcher._paused_partition_records:
        fetcher._next_partition_records = None


def fail_loudly_instead_of_epoch_bump(producer: Any) -> None:
    """Make a transactional producer fail (fatally) where kafka-python 3.0 would bump its epoch by itself.

    On a produce error of the KIP-360 kind (``OutOfOrderSequenceNumber``, ``UnknownProducerId``,
    ``InvalidProducerEpoch``: seen when a member wakes up from a freeze longer than the transaction timeout),
    kafka-python sends ``InitProducerId`` with its current epoch and goes on under the bumped one. The broker
    aborts the open transaction as part of that bump, but nothing tells the application: it still counts the
    records sent before as part of its transaction, and the soak saw it fail later with ``Invalid transition
    from BUMPING_PRODUCER_EPOCH to ABORTING_TRANSACTION``. The Java client makes such errors abortable for a
    transactional producer instead. Here they are made fatal: every later call (send, offsets, commit) raises,
    the processor aborts and rolls back to the last commit, and a fresh producer (``init_transactions``) takes
    over. Idempotent producers (at-least-once) keep kafka-python's recovery: they have no transaction to lose."""
    manager = getattr(producer, "_transaction_manager", None)
    if manager is None or not manager.is_transactional():
        return
    classify = manager.classify_batch_error

    def classify_without_bump(error: Any, batch: Any, log_start_offset: int = -1) -> str:
        outcome = classify(error, batch, log_start_offset)
        if outcome == manager.ERROR_CLASS_NEEDS_EPOCH_BUMP:
            return str(manager.ERROR_CLASS_FATAL)
        return str(outcome)

    manager.classify_batch_error = classify_without_bump


def send_offsets_to_transaction(producer: Any, offsets: Any, group_metadata: Any) -> None:
    """``producer.send_offsets_to_transaction``, without the offsets of an earlier attempt that failed.

    kafka-python 3.0.12 keeps the offsets of a ``TxnOffsetCommit`` in ``_pending_txn_offset_commits`` until the
    broker accepts them, and never clears them when the request fails for good or the transaction is aborted.
    The next transaction's offsets are added to the same dict and sent *with* them, under the new (valid) group
    membership. In the soak (zombies: members frozen past their session timeout), a zombie's refused commit
    (``UNKNOWN_MEMBER_ID``) thus rode along with its next transaction after it rejoined: offsets of partitions it
    no longer owned, from before its freeze, were committed. Backwards, they made other members replay
    (duplicates under exactly-once); forwards, past input whose outputs were never committed (lost records).
    Each transaction of the processor commits offsets once, after the previous attempt has ended, so anything
    pending at that point is stale and is dropped first."""
    manager = producer._transaction_manager
    with manager._lock:
        manager._pending_txn_offset_commits.clear()
    producer.send_offsets_to_transaction(offsets, group_metadata)


def check(consumer: Any) -> None:
    """Raise :class:`ClientCompatError` if a private attribute used above is missing or changed shape."""
    import kafka

    problems = []
    if not kafka.__version__.startswith(SUPPORTED):
        problems.append(f"kafka-python {kafka.__version__} (supported: {', '.join(SUPPORTED)}x)")
    net = getattr(consumer, "_net", None)
    if net is None or not callable(getattr(net, "sleep", None)):
        problems.append("KafkaConsumer._net.sleep is gone")
    elif len(inspect.signature(net.sleep).parameters) != 1:
        problems.append("KafkaConsumer._net.sleep no longer takes (delay)")
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None:
        problems.append("KafkaConsumer._fetcher is gone")
    else:
        if not hasattr(fetcher, "_next_partition_records"):
            problems.append("Fetcher._next_partition_records is gone")
        if not isinstance(getattr(fetcher, "_paused_partition_records", None), dict):
            problems.append("Fetcher._paused_partition_records is gone or not a dict")
    problems += _producer_problems()
    if problems:
        raise ClientCompatError("kafka-python internals changed: " + "; ".join(problems))


def _producer_problems() -> list[str]:
    from kafka.producer.transaction_manager import TransactionManager

    problems = []
    for name in ("ERROR_CLASS_NEEDS_EPOCH_BUMP", "ERROR_CLASS_FATAL"):
        if not isinstance(getattr(TransactionManager, name, None), str):
            problems.append(f"TransactionManager.{name} is gone")
    probe = TransactionManager(transactional_id="rwkv-stream-compat-probe", transaction_timeout_ms=1000)
    if not isinstance(getattr(probe, "_pending_txn_offset_commits", None), dict) or not hasattr(probe, "_lock"):
        problems.append("TransactionManager._pending_txn_offset_commits (a dict) or _lock is gone")
    classify = getattr(TransactionManager, "classify_batch_error", None)
    if classify is None or list(inspect.signature(classify).parameters)[:3] != ["self", "error", "batch"]:
        problems.append("TransactionManager.classify_batch_error(error, batch, ...) is gone or changed")
    return problems


def txn_offset_commit_version(producer: Any) -> int:
    """The TxnOffsetCommit version this (bootstrapped) producer sends to its broker: kafka-python 3.0 drives
    up to v3, the first with the consumer's generation id, member id and group instance id (KIP-447)."""
    from kafka.protocol.producer.transaction import TxnOffsetCommitRequest

    return producer._sender._client.api_version(TxnOffsetCommitRequest, max_version=3)
