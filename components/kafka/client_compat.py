"""Every use of kafka-python internals (private attributes) by the processor, in one place.

The processor otherwise uses kafka-python's public API only. What is used here, and why:

* ``KafkaConsumer._net.sleep``: the consumer's event loop's awaitable sleep. The rebalance listener runs on
  kafka-python's I/O thread as a coroutine; it must await a worker thread without blocking that loop (which
  also sends heartbeats), and kafka-python offers no public awaitable for it.
* ``KafkaConsumer._fetcher._next_partition_records`` / ``._paused_partition_records``: a kafka-python 3.0.12
  stall after pause/resume (see :func:`unpark_fetched_records`).

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
    if problems:
        raise ClientCompatError("kafka-python internals changed: " + "; ".join(problems))


def txn_offset_commit_version(producer: Any) -> int:
    """The TxnOffsetCommit version this (bootstrapped) producer sends to its broker: kafka-python 3.0 drives
    up to v3, the first with the consumer's generation id, member id and group instance id (KIP-447)."""
    from kafka.protocol.producer.transaction import TxnOffsetCommitRequest

    return producer._sender._client.api_version(TxnOffsetCommitRequest, max_version=3)
