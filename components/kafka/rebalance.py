"""Rebalances: partitions assigned, revoked (handed over) or lost (taken away while this member was fenced out).

kafka-python calls the listener on its I/O thread, from inside the main thread's ``poll()``. Assignment is only
noted (the main thread restores after ``poll()`` returns). Revocation and loss do slow work (waiting for a
background checkpoint, the final checkpoint before giving partitions up), so the listener hands it to a
short-lived worker thread and awaits it without blocking the I/O loop: heartbeats go on. The main thread is
blocked in ``poll()`` meanwhile, so the worker has the processor to itself.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.structs import TopicPartition

from . import client_compat
from .checkpoint import Delivery
from .checkpointing import Checkpointer
from .metrics import Metrics
from .partitions import PartitionBook
from .residency import Residency

log = logging.getLogger("rwkv_stream.kafka")


class RebalanceHandler:
    def __init__(self, book: PartitionBook, residency: Residency, checkpointer: Checkpointer, delivery: Delivery,
                 metrics: Metrics) -> None:
        self.book = book
        self.residency = residency
        self.checkpointer = checkpointer
        self.delivery = delivery
        self.metrics = metrics
        self.closing = False  # the clients are closing: revoked partitions get no final checkpoint

    def on_assigned(self, assigned: set[TopicPartition]) -> None:
        """I/O thread, inside poll(): just remember; the main thread restores after poll() returns."""
        self.book.to_restore |= assigned
        self.metrics.rebalances.labels("assigned").inc()
        log.info("partitions assigned", extra={"partitions": _numbers(assigned)})

    def on_revoked(self, revoked: set[TopicPartition]) -> None:
        """Worker thread, while poll() is blocked: final checkpoint, then drop the partitions' streams."""
        self.metrics.rebalances.labels("revoked").inc()
        log.info("partitions revoked", extra={"partitions": _numbers(revoked)})
        if not self.closing:
            self.checkpointer.checkpoint()
        self.residency.drop_partitions(revoked)

    def on_lost(self, lost: set[TopicPartition]) -> None:
        """Worker thread: the group moved on without us; nothing may be written for these partitions."""
        self.metrics.rebalances.labels("lost").inc()
        log.warning("partitions lost", extra={"partitions": _numbers(lost)})
        self.checkpointer.await_background_job()
        self.delivery.abort()
        if self.delivery.exactly_once:  # the aborted transaction covered every partition
            self.checkpointer.rollback()
        self.residency.drop_partitions(lost)

    def on_gone(self, gone: set[TopicPartition]) -> None:
        """Main thread: partitions this member still holds that the consumer no longer has, without a callback
        having said so. Seen in soak runs with kafka-python 3.0.12: a member frozen past its session timeout
        woke up, rejoined and was assigned other partitions, with neither ``on_partitions_lost`` nor
        ``on_partitions_revoked`` for the ones it had; it then processed their buffered records under its new
        membership and (exactly-once) committed duplicates. Handled like lost partitions."""
        log.warning("partitions gone without a rebalance callback", extra={"partitions": _numbers(gone)})
        self.metrics.rebalances.labels("lost").inc()
        self.residency.drop_partitions(gone)  # first: a rollback must not seek partitions the consumer lacks
        self.checkpointer.await_background_job()
        self.delivery.abort()
        if self.delivery.exactly_once:  # the aborted transaction covered every partition
            self.checkpointer.rollback()


    def on_rejoined(self, held: set[TopicPartition]) -> None:
        """Main thread: the consumer is in the group under a new member id (it was fenced out, e.g. frozen past
        its session timeout, and rejoined) and still holds these partitions, with no callback having said so.
        Seen in the soak with kafka-python 3.0.12: a member frozen in the middle of a rebalance woke up, rejoined
        and was handed back the same partitions (another member had processed and committed them meanwhile)
        without ``on_partitions_lost``/``on_partitions_assigned``, and went on from its own position and states:
        under exactly-once it committed duplicates. Handled like lost partitions that are assigned again: the
        uncommitted work is thrown away and the partitions are restored from what the group committed."""
        log.warning("group member id changed without a rebalance callback: restoring the partitions held",
                    extra={"partitions": _numbers(held)})
        self.metrics.rebalances.labels("lost").inc()
        self.checkpointer.await_background_job()
        self.delivery.abort()
        self.checkpointer.rollback()  # every held partition back to to_restore: restored as if just assigned


class RebalanceListener(AsyncConsumerRebalanceListener):
    """Runs on kafka-python's I/O thread; slow work goes to a worker thread that it awaits."""

    def __init__(self, handler: RebalanceHandler, consumer: KafkaConsumer) -> None:
        self.handler = handler
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._offload(self.handler.on_revoked, set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.handler.on_assigned(set(assigned))

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        await self._offload(self.handler.on_lost, set(lost))

    async def _offload(self, work: Callable[[set[TopicPartition]], None], tps: set[TopicPartition]) -> None:
        error: list[BaseException] = []

        def target() -> None:
            try:
                work(tps)
            except BaseException as exc:  # reported below, never lost in the thread
                error.append(exc)

        worker = threading.Thread(target=target, name="rwkv-rebalance", daemon=True)
        worker.start()
        sleep = client_compat.event_loop_sleep(self.consumer)
        while worker.is_alive():
            await sleep(0.005)
        if error:
            log.error("rebalance handling failed", exc_info=error[0])


def _numbers(tps: set[TopicPartition]) -> list[int]:
    return sorted(tp.partition for tp in tps)
